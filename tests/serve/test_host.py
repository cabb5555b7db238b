"""LoraHost (torch + PEFT, no Ray): unmerged adapters, mixed batches, pristine base weights."""

from __future__ import annotations

import pytest
import torch

from engine.adapters.io import load_adapter
from serve.host import BASE_ADAPTER, LoraHost
from tests.conftest import tiny_llama

PROMPTS = [[1, 5, 9, 12], [1, 7], [1, 3, 3, 3, 8, 22]]


@pytest.fixture
def host_and_adapters(adapter_factory):
    # B scaled up so each adapter changes the greedy output (a mix-up would show)
    adapters = [load_adapter(adapter_factory(seed=s, alpha=64)) for s in (1, 2)]
    host = LoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0)
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
        got = host.model(input_ids=ids, adapter_names=["a0"]).logits
    torch.testing.assert_close(got, expected)


def test_budgets_and_eos(host_and_adapters):
    host, _ = host_and_adapters
    out = host.generate(PROMPTS, ["a0", "a1", BASE_ADAPTER], [0, 3, 5])
    assert out[0] == [] and len(out[1]) <= 3 and len(out[2]) <= 5
    assert all(2 not in o for o in out)


def test_swaps_leave_the_base_weights_bit_identical(host_and_adapters):
    host, adapters = host_and_adapters
    fresh = LoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0).base_fingerprint()
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
    """Reference decoding: the whole sequence through PEFT's per-sample path at every step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(budget):
            logits = host.model(input_ids=torch.tensor([ids]), adapter_names=[name]).logits
            token = int(logits[0, -1].argmax())
            if token == host.eos_token_id:
                break
            ids.append(token)
    return ids[len(prompt) :]


def test_cached_decoding_equals_recomputing_the_whole_sequence(host_and_adapters):
    host, _ = host_and_adapters
    names = ["a0", BASE_ADAPTER, "a1"]
    # references first: generate() may leave the adapter layers disabled for a base-only batch
    expected = {n: [_greedy_without_cache(host, p, n, 6) for p in PROMPTS] for n in names}
    mixed = [expected[n][i] for i, n in enumerate(names)]
    assert host.generate(PROMPTS, names, [6] * 3) == mixed  # mixed batch, left padding
    for name in names:  # batches of one adapter take PEFT's plain path
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
