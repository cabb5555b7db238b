"""RegMean's input Gram matrices through the LoRA host (padding left out), and regmean fusing from
the support examples."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import load_adapter
from engine.fusion import FusionContext, fuse_adapters
from engine.tasks.fewshot import FewShotObjective
from engine.tasks.functional import adapter_factors
from engine.tasks.grams import input_gram_sums, input_grams


def test_grams_are_the_inputs_of_each_module(demo_catalog):
    catalog = demo_catalog.catalog
    objective = FewShotObjective.from_catalog(catalog, ["copy"], catalog.layout(), k=6)
    host, batch = objective.host, objective.shots["copy"].batch
    base = input_grams(host, batch)
    assert set(base) == {m.name for m in host.layout.modules}
    # Independently: layer 0's q_proj sees the first input norm of the token embeddings.
    llama = host.model.get_base_model().model
    with torch.no_grad():
        x = llama.layers[0].input_layernorm(llama.embed_tokens(batch["input_ids"]))
    x = x[batch["attention_mask"].bool()].double()  # real tokens only (padding left out)
    first = next(n for n in base if n.endswith("layers.0.self_attn.q_proj"))
    torch.testing.assert_close(base[first], x.T @ x / x.shape[0])
    # Through an adapter: layer 0's inputs are unchanged, a later layer's are not.
    adapter = load_adapter(demo_catalog.dirs["copy"])
    adapted = input_grams(host, batch, adapter_factors(adapter, host.layout))
    torch.testing.assert_close(adapted[first], base[first])
    last = next(n for n in reversed(list(base)) if n.endswith("q_proj"))
    assert not torch.allclose(adapted[last], base[last])


def test_grams_do_not_depend_on_how_examples_are_batched(demo_catalog):
    """Padding is left out: a short example padded in a batch adds what it adds on its own."""
    catalog = demo_catalog.catalog
    objective = FewShotObjective.from_catalog(catalog, ["copy"], catalog.layout(), k=1)
    host, model = objective.host, objective.host.task_model
    rows = [
        {"prompt": "<copy> 4 9 <sep>", "completion": "4 9"},
        {"prompt": "<copy> 7 3 7 3 1 6 <sep>", "completion": "7 3 7 3 1 6"},
    ]
    together = model.encode(rows)
    assert not together["attention_mask"].bool().all()  # the short row is padded
    sums, counts = input_gram_sums(host, together)
    parts = [input_gram_sums(host, model.encode([row])) for row in rows]
    for name, total in sums.items():
        assert counts[name] == sum(p[1][name] for p in parts)
        separate = parts[0][0][name] + parts[1][0][name]
        assert float((total - separate).norm() / separate.norm()) <= 1e-5  # float32 forwards


@pytest.mark.slow
def test_regmean_from_the_support_examples(demo_catalog):
    catalog = demo_catalog.catalog
    objective = FewShotObjective.from_catalog(catalog, ["copy", "reverse"], catalog.layout(), k=8)
    adapters = [load_adapter(demo_catalog.dirs[t]) for t in ("copy", "reverse")]
    context = FusionContext(objective=objective)
    # Two copies of one adapter: RegMean returns it (the Gram matrices cancel).
    same = fuse_adapters(
        [adapters[0]] * 2, "regmean", params={"shrink": 0.0}, tasks=["copy", "reverse"], context=context
    )
    for name, module in same.adapter.modules.items():
        expected = adapters[0].modules[name].delta()
        assert float((module.delta() - expected).norm() / expected.norm()) < 1e-4
    picked = fuse_adapters(adapters, "regmean", tasks=["copy", "reverse"], context=context)
    details = picked.provenance["details"]
    assert details["source"] == {"shrink": "support"} and len(details["candidates"]) == 6
    assert details["support_loss"] == min(c["loss"] for c in details["candidates"])
    through = fuse_adapters(
        adapters,
        "regmean",
        params={"inputs_from": "adapter", "shrink": 0.9},
        tasks=["copy", "reverse"],
        context=FusionContext(objective=objective),
    )
    assert through.provenance["params"]["inputs_from"] == "adapter"
    assert all(
        torch.isfinite(m.A).all() and torch.isfinite(m.B).all() for m in through.adapter.modules.values()
    )
