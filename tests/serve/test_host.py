"""MultiLoraHost (torch + PEFT, no Ray): unmerged adapters, mixed batches, pristine base weights."""

from __future__ import annotations

import pytest
import torch

from engine.adapters.io import load_adapter
from engine.adapters.lora import LoraAdapter
from serve.host import BASE_ADAPTER, MultiLoraHost
from tests.helpers import tiny_llama

PROMPTS = [[1, 5, 9, 12], [1, 7], [1, 3, 3, 3, 8, 22]]


@pytest.fixture
def host_and_adapters(adapter_factory):
    # B scaled up so each adapter changes the greedy output (a mix-up would show)
    adapters = [load_adapter(adapter_factory(seed=s, alpha=64)) for s in (1, 2)]
    host = MultiLoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0)
    for i, adapter in enumerate(adapters):
        host.add(f"a{i}", adapter)
    return host, adapters


def test_mixed_batch_equals_one_sample_at_a_time(host_and_adapters):
    host, _ = host_and_adapters
    names = ["a0", BASE_ADAPTER, "a1"]
    mixed = host.generate(PROMPTS, names, [6, 6, 6])
    alone = [host.generate([p], [n], [6])[0] for p, n in zip(PROMPTS, names, strict=True)]
    assert mixed == alone
    same_prompt = host.generate([PROMPTS[0]] * 3, ["a0", "a1", BASE_ADAPTER], [6] * 3)
    assert len({tuple(o) for o in same_prompt}) == 3  # each adapter really changes the output


def test_adapter_equals_stock_peft_forward(host_and_adapters, adapter_factory):
    from peft import PeftModel

    host, _ = host_and_adapters
    path = adapter_factory(seed=1, alpha=64)
    reference = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = host.forward(["a0"], input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def test_budgets_and_eos(host_and_adapters):
    host, _ = host_and_adapters
    out = host.generate(PROMPTS, ["a0", "a1", BASE_ADAPTER], [0, 3, 5])
    assert out[0] == [] and len(out[1]) <= 3 and len(out[2]) <= 5
    assert all(2 not in o for o in out)


def test_swaps_leave_the_base_weights_bit_identical(host_and_adapters):
    host, adapters = host_and_adapters
    fresh = MultiLoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0).base_fingerprint()
    assert host.base_fingerprint() == fresh
    for round_ in range(3):
        host.remove("a0")
        host.add("a0", adapters[round_ % 2])
        host.generate(PROMPTS, ["a0", "a1", BASE_ADAPTER], [2, 2, 2])
    assert host.base_fingerprint() == fresh
    host.remove("a0")
    assert "a0" not in host.names


def test_ignore_eos_generates_exactly_the_budget(host_and_adapters):
    host, _ = host_and_adapters
    host.eos_token_id = host.generate([PROMPTS[0]], ["a0"], [1])[0][0]  # make the first token eos
    assert host.generate([PROMPTS[0]], ["a0"], [4]) == [[]]
    assert len(host.generate([PROMPTS[0]], ["a0"], [4], ignore_eos=[True])[0]) == 4


def _greedy_without_cache(host, prompt, name, budget):
    """Reference decoding: the whole sequence, no KV cache, one sample at a time."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(budget):
            logits = host.forward([name], input_ids=torch.tensor([ids])).logits
            token = int(logits[0, -1].argmax())
            if token == host.eos_token_id:
                break
            ids.append(token)
    return ids[len(prompt) :]


def test_cached_decoding_equals_recomputing_the_whole_sequence(host_and_adapters):
    host, _ = host_and_adapters
    names = ["a0", BASE_ADAPTER, "a1"]
    expected = {n: [_greedy_without_cache(host, p, n, 6) for p in PROMPTS] for n in names}
    mixed = [expected[n][i] for i, n in enumerate(names)]
    assert host.generate(PROMPTS, names, [6] * 3) == mixed  # mixed batch, left padding
    for name in names:  # batches of one adapter take the single-adapter route
        assert host.generate(PROMPTS, [name] * 3, [6] * 3) == expected[name]
    assert host.generate(PROMPTS, names, [6] * 3) == mixed  # and back to a mixed batch


def test_interleaved_streams_keep_their_own_adapter(host_and_adapters):
    """Streams advance one step at a time between other batches on the model thread."""
    host, _ = host_and_adapters
    alone = {n: host.generate([PROMPTS[0]], [n], [6], [True])[0] for n in ("a0", "a1", BASE_ADAPTER)}
    streams = {n: host.steps([PROMPTS[0]], [n], [6], [True]) for n in alone}
    got: dict[str, list[int]] = {n: [] for n in alone}
    for _ in range(6):
        for name, stream in streams.items():
            got[name].append(next(stream)[0])
            host.generate([PROMPTS[1]], ["a1"], [1])  # another batch in between
    assert got == alone


def test_mixed_ranks_and_targets_equal_stock_peft_per_sample(adapter_factory):
    from peft import PeftModel

    specs = [
        {"seed": 3, "r": 2, "alpha": 32, "target_modules": ("o_proj", "gate_proj")},
        {"seed": 4, "r": 8, "alpha": 16, "use_rslora": True},
    ]
    paths = [adapter_factory(**spec) for spec in specs]
    host = MultiLoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0)
    for i, path in enumerate(paths):
        host.add(f"m{i}", load_adapter(path))
    ids = torch.tensor([PROMPTS[0], PROMPTS[0], PROMPTS[0]])
    with torch.inference_mode():
        got = host.forward(["m0", BASE_ADAPTER, "m1"], input_ids=ids).logits
        expected = [PeftModel.from_pretrained(tiny_llama(), str(p)).eval() for p in paths]
        torch.testing.assert_close(got[0], expected[0](input_ids=ids[:1]).logits[0])
        torch.testing.assert_close(got[1], tiny_llama()(input_ids=ids[:1]).logits[0])
        torch.testing.assert_close(got[2], expected[1](input_ids=ids[:1]).logits[0])


def test_a_misfit_adapter_is_rejected_and_changes_nothing(host_and_adapters, adapter_factory):
    host, _ = host_and_adapters
    before = host.generate(PROMPTS, ["a0", "a1", BASE_ADAPTER], [4] * 3)
    misfit = load_adapter(adapter_factory(seed=5, base=tiny_llama(hidden=48)))
    with pytest.raises(ValueError, match="does not fit the base model"):
        host.add("a0", misfit)  # would replace a0: must keep the old one
    stray = LoraAdapter(modules={"model.nope.q_proj": next(iter(misfit.modules.values()))}, config={})
    with pytest.raises(ValueError, match="lacks"):
        host.add("x", stray)
    with pytest.raises(ValueError, match="modules_to_save"):
        adapter = load_adapter(adapter_factory(seed=7))
        adapter.extras = {"lm_head.weight": torch.zeros(64, 32)}
        host.add("y", adapter)
    with pytest.raises(KeyError, match="not attached"):
        host.generate([PROMPTS[0]], ["x"], [2])
    assert host.names == {"a0", "a1"}
    assert host.generate(PROMPTS, ["a0", "a1", BASE_ADAPTER], [4] * 3) == before
