"""``report.png``: the kept/rejected task table of a lab as bar charts (one panel per suite)."""

from __future__ import annotations

from pathlib import Path


def write_report_chart(manifest: dict, path: Path) -> Path:
    """Encoder: base+head, mean-pool probe and LoRA accuracy per task (rejected tasks hatched).
    Generative: base and LoRA answer-token loss per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    suites = [s for s in ("encoder", "generative") if s in manifest["suites"]]
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 4.2 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites, strict=True):
        rows = manifest["suites"][suite]["report"]
        x = np.arange(len(rows))
        if suite == "encoder":
            series = [
                ("base + linear head", "base_head_accuracy"),
                ("mean-pool probe", "mean_pool_probe_accuracy"),
                ("LoRA (mean of main runs)", "lora_accuracy"),
            ]
            ax.set_ylabel("eval accuracy")
            ax.plot(x, [r["chance_accuracy"] for r in rows], "k_", markersize=18, label="chance")
        else:
            series = [("base", "base_loss"), ("LoRA (mean of main runs)", "lora_loss")]
            ax.set_ylabel("eval answer-token loss (nats)")
        width = 0.8 / len(series)
        for i, (label, key) in enumerate(series):
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [r[key] for r in rows], width, label=label)
            for bar, row in zip(bars, rows, strict=True):
                if not row["kept"]:
                    bar.set_hatch("//")
                    bar.set_alpha(0.5)
        ax.set_xticks(x, [r["task"] + ("" if r["kept"] else "\n(rejected)") for r in rows], fontsize=8)
        ax.set_title(f"{suite} suite (size {manifest.get('size')}, seed {manifest.get('seed')})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
