"""Serving latency: base-only vs cached / cold adapters, cold fusion specs and mixed workloads.

Runs the real application (Ray Serve, HTTP on 127.0.0.1) over the lab's generative suite and
times OpenAI-style requests end to end, in one run so every ratio compares numbers measured side
by side: scenarios are sent in round-robin chunks, so background load hits them alike, and every
request generates exactly ``max_tokens`` tokens (``ignore_eos``), so no scenario is faster only
because its adapter stops early. Latency scenarios send one request at a time; mixed workloads
send 8 at a time over 8 or 64 adapters with a cache smaller than the working set, to two apps
running side by side that differ only in batching: ``mixed`` (one forward, each sample routed to
its adapter) and ``grouped`` (one forward per adapter within a Serve batch).

    python -m benchmarks.serve_latency                       # standard lab, writes results/serve_latency.*
    python -m benchmarks.serve_latency --lab DIR --fvae DIR --quick
    python -m benchmarks.serve_latency --large-base          # results/serve_latency_large_base.*

``--large-base`` times the replica's decode path alone (:class:`serve.host.MultiLoraHost`, no HTTP or
Ray: the router and transport cost the same with or without an adapter) on a random Llama of
hidden 512 and 8 layers, where the matmuls outweigh the fixed per-module cost of the LoRA wrapper:
base-only against one cached rank-8 adapter on every attention and MLP projection, interleaved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, environment, write_json

PORT = 18766
PROMPTS = ["reverse:planet=", "copy:garden=", "upper:stone=", "sort:winter=", "shift:apple="]


def post(model: str, prompt: str, max_tokens: int, prefix: str = "") -> float:
    """Seconds for one completion of exactly ``max_tokens`` tokens over HTTP (raises on non-200)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}{prefix}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


def timed_chunk(models: list[str], concurrency: int, max_tokens: int, prefix: str = "") -> tuple[list, float]:
    """(per-request seconds, wall seconds) of ``models`` sent ``concurrency`` at a time."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(models))]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        seconds = list(
            pool.map(lambda mp: post(mp[0], mp[1], max_tokens, prefix), zip(models, prompts, strict=True))
        )
    return seconds, time.perf_counter() - start


def interleaved(scenarios: dict[str, tuple[list[str], int, str]], max_tokens: int, rounds: int) -> dict:
    """Run every scenario's requests in ``rounds`` chunks, round-robin, so that load from other
    processes on a shared machine hits all scenarios alike; then summarise each."""
    seconds: dict[str, list[float]] = {k: [] for k in scenarios}
    walls = dict.fromkeys(scenarios, 0.0)
    for r in range(rounds):
        for name, (models, concurrency, prefix) in scenarios.items():
            chunk = models[r * len(models) // rounds : (r + 1) * len(models) // rounds]
            s, wall = timed_chunk(chunk, concurrency, max_tokens, prefix)
            seconds[name] += s
            walls[name] += wall
    return {
        name: summarise(seconds[name], walls[name], models, concurrency)
        for name, (models, concurrency, _) in scenarios.items()
    }


def summarise(seconds: list[float], wall: float, models: list[str], concurrency: int) -> dict[str, Any]:
    """p50/p99 latency (ms) and throughput (requests/s)."""
    ms = np.array(seconds) * 1000
    return {
        "requests": len(models),
        "distinct_models": len(set(models)),
        "concurrency": concurrency,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "throughput_rps": round(len(models) / wall, 2),
        "loadavg_after": os.getloadavg(),
    }


def spec(method: str, tasks: list[str], weights: list[float]) -> str:
    return json.dumps({"method": method, "tasks": tasks, "weights": [round(w, 4) for w in weights]})


def deploy(lab: Path, fvae: str | None, batching: str, cache_size: int, prefix: str) -> None:
    from ray import serve

    from serve.app import build_app

    gen = lab / "generative"
    args = {
        "catalog": str(gen / "catalogs" / "main"),
        "base_model": str(gen / "base"),
        "tokenizer": str(gen / "base" / "char_tokenizer.json"),
        "fvae": fvae,
        "cache_size": cache_size,
        "batching": batching,
        "max_batch_size": 8,
        "auth_token_env": None,
        "limits": {"max_tokens": 64},
    }
    serve.run(build_app(args), name=f"icmf-{batching}", route_prefix=prefix or "/")


def latency_scenarios(catalog, tasks: list[str], fvae: str | None, n: int, rng) -> dict:
    """One request at a time: base-only, one cached adapter, cold stored adapters, cold specs."""
    ids = [e["id"] for e in catalog.entries()]
    rng.shuffle(ids)

    def cold_specs(method: str) -> list[str]:
        return [spec(method, rng.sample(tasks, 2), [rng.uniform(0.3, 0.7) for _ in "ab"]) for _ in range(n)]

    scenarios = {
        "base_only": ["base"] * n,
        "cached_adapter": [ids[0]] * n,
        "cold_stored_adapter": ids[1 : 1 + n],
        "cold_fusion_task_arithmetic": cold_specs("task_arithmetic"),
    }
    if fvae:
        scenarios["cold_fusion_icm"] = cold_specs("icm")
    return {k: (v, 1, "") for k, v in scenarios.items()}


def mixed_workloads(ids: list[str], n: int, rng) -> dict:
    """Concurrency 8 over 8 and 64 adapters, on both apps (batching modes), same request lists."""
    out = {}
    for working_set in (8, 64):
        models = [rng.choice(ids[:working_set]) for _ in range(n)]
        for mode, prefix in (("mixed", ""), ("grouped", "/grouped")):
            out[f"{mode}/{working_set}_adapters"] = (models, 8, prefix)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["latency"]
    names = list(lat)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(names))
    left.bar(x - 0.2, [lat[k]["p50_ms"] for k in names], 0.4, label="p50")
    left.bar(x + 0.2, [lat[k]["p99_ms"] for k in names], 0.4, label="p99")
    left.set_xticks(x, [k.replace("_", "\n") for k in names], fontsize=7)
    left.set_ylabel("latency (ms), one request at a time")
    left.set_title(f"vs base-only p50 {lat['base_only']['p50_ms']:.0f} ms")
    left.legend()
    mixed = result["mixed"]
    keys = list(next(iter(mixed.values())))
    x = np.arange(len(keys))
    for i, (mode, rows) in enumerate(mixed.items()):
        right.bar(
            x + (i - 0.5) * 0.4, [rows[k]["throughput_rps"] for k in keys], 0.4, label=f"batching={mode}"
        )
    right.set_xticks(x, keys)
    right.set_ylabel("throughput (requests/s), concurrency 8")
    right.set_title(f"mixed workloads, cache {result['config']['cache_size']} adapters")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


LARGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def large_base(hidden: int, layers: int, rank: int, requests: int, rounds: int, max_tokens: int) -> dict:
    """p50 of base-only vs a cached adapter on the decode path of a larger random base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.adapters.lora import LoraAdapter, LoraModule
    from serve.host import BASE_ADAPTER, MultiLoraHost

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as a replica runs (torch_threads: 1)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    modules = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LARGE_TARGETS:
            a = torch.randn(rank, module.in_features) / module.in_features**0.5
            modules[name] = LoraModule(A=a, B=torch.randn(module.out_features, rank) * 0.01, scaling=2.0)
    host = MultiLoraHost(model, eos_token_id=2, pad_token_id=0)
    host.add("adapter", LoraAdapter(modules=modules, config={"r": rank}))
    prompt = list(range(3, 3 + 15))
    scenarios = {"base_only": BASE_ADAPTER, "cached_adapter": "adapter"}
    for name in scenarios.values():  # warm-up
        host.generate([prompt], [name], [max_tokens], [True])
    seconds: dict[str, list[float]] = {k: [] for k in scenarios}
    for _ in range(rounds):
        for key, name in scenarios.items():
            for _ in range(max(requests // rounds, 1)):
                start = time.perf_counter()
                host.generate([prompt], [name], [max_tokens], [True])
                seconds[key].append(time.perf_counter() - start)
    p50 = {k: float(np.median(v)) * 1e3 for k, v in seconds.items()}
    return {
        "config": {"hidden": hidden, "layers": layers, "rank": rank, "targets": list(LARGE_TARGETS)},
        "requests": {k: len(v) for k, v in seconds.items()},
        "p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "p99_ms": {k: round(float(np.percentile(v, 99)) * 1e3, 2) for k, v in seconds.items()},
        "cached_adapter_over_base_p50": round(p50["cached_adapter"] / p50["base_only"], 3),
    }


def main_large_base(args) -> int:
    result = {
        "loadavg_before": os.getloadavg(),
        "note": "MultiLoraHost decode path only (no HTTP, no Ray); scenarios interleaved per round",
        "max_tokens": args.max_tokens,
        **large_base(512, 8, 8, args.requests, args.rounds, args.max_tokens),
        "loadavg_after": os.getloadavg(),
        "environment": environment(),
    }
    result["goals"] = {"cached_adapter_p50_le_1.10x_base": result["cached_adapter_over_base_p50"] <= 1.10}
    write_json("serve_latency_large_base", result, Path(args.out))
    print(json.dumps({k: result[k] for k in ("p50_ms", "cached_adapter_over_base_p50", "goals")}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lab", default=str(RESULTS / "lab" / "standard-seed0"))
    parser.add_argument(
        "--fvae", default=None, help="F-VAE artifact of the lab's main catalog (icm scenario)"
    )
    parser.add_argument("--requests", type=int, default=40, help="requests per latency scenario")
    parser.add_argument("--mixed-requests", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="round-robin chunks per scenario")
    parser.add_argument("--quick", action="store_true", help="a few requests each (smoke test)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--large-base", action="store_true", help="only the hidden-512, 8-layer decode-path run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.mixed_requests, args.rounds = 8, 32, 2
    if args.large_base:
        return main_large_base(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from engine.catalog.catalog import Catalog

    lab = Path(args.lab)
    catalog = Catalog(lab / "generative" / "catalogs" / "main")
    tasks = sorted(catalog.tasks())
    ids = [e["id"] for e in catalog.entries()]
    random.Random(0).shuffle(ids)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "loadavg_before": os.getloadavg(),
        "note": "each request generates exactly max_tokens tokens (ignore_eos); scenarios interleaved",
    }
    try:
        deploy(lab, args.fvae, "mixed", args.cache_size, "")
        deploy(lab, args.fvae, "grouped", args.cache_size, "/grouped")
        for prefix in ("", "/grouped"):  # warm-up: first forward, first load, first batch
            timed_chunk(["base", ids[-1], *ids[-8:]], 8, args.max_tokens, prefix)
        latency = latency_scenarios(catalog, tasks, args.fvae, args.requests, random.Random(1))
        result["latency"] = interleaved(latency, args.max_tokens, args.rounds)
        mixed = mixed_workloads(ids, args.mixed_requests, random.Random(2))
        rows = interleaved(mixed, args.max_tokens, args.rounds)
        result["mixed"] = {
            mode: {k.split("/")[1]: v for k, v in rows.items() if k.startswith(mode + "/")}
            for mode in ("mixed", "grouped")
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    base = result["latency"]["base_only"]["p50_ms"]
    result["ratios_vs_base_p50"] = {k: round(v["p50_ms"] / base, 3) for k, v in result["latency"].items()}
    m, g = result["mixed"]["mixed"], result["mixed"]["grouped"]
    result["batching_throughput_mixed_over_grouped"] = {
        k: round(m[k]["throughput_rps"] / g[k]["throughput_rps"], 3) for k in m
    }
    result["goals"] = {
        "cached_adapter_p50_le_1.10x_base": result["ratios_vs_base_p50"]["cached_adapter"] <= 1.10,
        "cold_fusion_p50_le_1.5x_base": {
            k: v <= 1.5 for k, v in result["ratios_vs_base_p50"].items() if k.startswith("cold_fusion")
        },
    }
    result["loadavg_after"] = os.getloadavg()
    result["environment"] = environment()
    out = Path(args.out)
    write_json("serve_latency", result, out)
    plot(result, out / "serve_latency.png")
    keys = ("ratios_vs_base_p50", "batching_throughput_mixed_over_grouped", "goals")
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
