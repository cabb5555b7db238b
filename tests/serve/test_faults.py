"""The serving faults of issue 16, one test each, without Ray (milliseconds to seconds).

The end-to-end counterparts (the served lab over HTTP) are in ``test_app.py``.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from serve.spec import ModelFieldError, parse_model_field


def spec(**fields) -> str:
    return json.dumps(fields)


# ---------------------------------------------------------------- 1. deep JSON
def test_deeply_nested_spec_is_a_422_not_a_recursion_error():
    model = '{"method":' + "[" * 2000 + "]" * 2000 + "}"
    with pytest.raises(ModelFieldError) as info:
        parse_model_field(model, max_chars=10_000)
    assert info.value.status == 422 and "nest" in str(info.value)


def test_deeply_nested_body_is_a_400():
    from serve.app import ApiError, parse_completion_body

    with pytest.raises(ApiError) as info:
        parse_completion_body(b"[" * 50_000)
    assert info.value.status == 400 and "nest" in str(info.value)


# ---------------------------------------------------------------- 2. numbers
@pytest.mark.parametrize(
    "model",
    [
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "params": {"lam": NaN}}',
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "params": {"lam": -Infinity}}',
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "weights": [1e300, 1e300]}',
        '{"method": "ties", "tasks": ["a", "b"], "weights": [1e30, 1e30]}',
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "params": {"lam": 1e300}}',
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "params": {"lam": [[1]]}}',
        '{"method": "task_arithmetic", "tasks": ["a", "b"], "seed": 1e400}',
    ],
)
def test_non_finite_huge_or_nested_spec_numbers_are_422(model):
    with pytest.raises(ModelFieldError) as info:
        parse_model_field(model)
    assert info.value.status == 422


def test_spec_params_are_checked_against_the_method_before_any_fusion():
    from serve.spec import check_method_params

    with pytest.raises(ModelFieldError, match="lam") as info:
        check_method_params({"method": "task_arithmetic", "params": {"lam": "x"}})
    assert info.value.status == 422
    with pytest.raises(ModelFieldError, match="no-such"):
        check_method_params({"method": "no-such", "params": {}})
    check_method_params({"method": "ties", "params": {"density": 0.4}})


def test_body_with_nan_is_a_400():
    from serve.app import ApiError, parse_completion_body

    with pytest.raises(ApiError) as info:
        parse_completion_body(b'{"model": "base", "prompt": "a", "temperature": NaN}')
    assert info.value.status == 400 and "NaN" in str(info.value)


def _adapter(scale: float):
    from engine.adapters.lora import LoraAdapter, LoraModule

    module = LoraModule(A=torch.ones(2, 4), B=torch.full((4, 2), scale), scaling=2.0)
    return LoraAdapter(modules={"m": module}, config={})


def test_fused_adapter_is_checked_finite_and_bounded_before_attaching():
    from serve.deployment import LoadError, check_servable

    check_servable(_adapter(0.5))
    for scale in (float("nan"), float("inf"), 1e30):
        with pytest.raises(LoadError) as info:
            check_servable(_adapter(scale))
        assert info.value.status == 422


def test_only_request_faults_are_negative_cached():
    from serve.cache import AdapterCache
    from serve.deployment import LoadError

    calls = []

    async def loader(adapter_id):
        calls.append(adapter_id)
        raise LoadError("bad spec", 422) if adapter_id == "user" else RuntimeError("disk")

    async def unloader(_id, _value):
        return None

    async def run():
        cache = AdapterCache(
            loader, unloader, capacity=2, negative_ttl_s=60, remember_failure=LoadError.is_user_fault
        )
        for adapter_id in ("user", "user", "server", "server"):
            with pytest.raises((LoadError, RuntimeError)):
                async with cache.lease(adapter_id):
                    pass
        return cache

    cache = asyncio.run(run())
    assert calls == ["user", "server", "server"]  # the 422 replayed, the server fault retried
    assert cache.stats.negative_hits == 1


# ---------------------------------------------------------------- 3. chunked bodies
def test_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit():
    from starlette.requests import Request

    from serve.app import ApiError, read_body_limited

    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(sent) < 10_000}

    scope = {"type": "http", "method": "POST", "headers": [(b"transfer-encoding", b"chunked")]}

    async def run():
        return await read_body_limited(Request(scope, receive), 4096)

    with pytest.raises(ApiError) as info:
        asyncio.run(run())
    assert info.value.status == 413
    assert len(sent) <= 5  # 5 KB read, not 10 MB


# ---------------------------------------------------------------- 6. metrics
def test_metric_names_and_labels_are_bounded():
    from serve import metrics

    names = metrics.metric_names()
    assert all(name.startswith("icmf_") for name in names)
    assert "icmf_icm_inputs_cache_events" in names
    for name, tags in metrics.TAG_KEYS.items():
        assert "adapter" not in tags, name  # client-chosen ids never become label values


def _scrape(registry) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_replica_metrics_add_up_at_the_router_across_pushes_failures_and_deaths():
    from serve.metrics import MetricsAggregate, ReplicaMetrics, RequestMetrics

    now = [0.0]
    router = RequestMetrics(MetricsAggregate(stale_s=10, clock=lambda: now[0]))
    one, two = ReplicaMetrics(), ReplicaMetrics()
    one.cache_event("hit", "a-b-c", None)
    one.cache_event("hit", "x", None)
    two.cache_event("hit", "y", None)
    one.batch_size(3)
    two.batch_size(8)
    one.icm_inputs(hits=2, misses=1)
    one.in_flight("fusion", +1)
    for replica, name in ((one, "r1"), (two, "r2")):
        changes = replica.changes()
        router.replicas.add(name, changes)
        replica.acknowledge(changes)
    one.cache_event("miss", "z", None)
    one.icm_inputs(hits=5, misses=1)
    lost = one.changes()  # this push fails: not acknowledged, so its increments go again
    one.cache_event("miss", "w", None)
    retried = one.changes()
    router.replicas.add("r1", retried)
    one.acknowledge(retried)
    assert lost != retried
    got = _scrape(router.registry)
    assert got[("icmf_adapter_cache_events_total", (("event", "hit"),))] == 3
    assert got[("icmf_adapter_cache_events_total", (("event", "miss"),))] == 2
    assert got[("icmf_icm_inputs_cache_events_total", (("event", "hit"),))] == 5
    assert got[("icmf_icm_inputs_cache_events_total", (("event", "miss"),))] == 1
    assert got[("icmf_batch_size_count", ())] == 2 and got[("icmf_batch_size_sum", ())] == 11
    assert got[("icmf_batch_size_bucket", (("le", "4.0"),))] == 1
    assert got[("icmf_batch_size_bucket", (("le", "+Inf"),))] == 2
    assert got[("icmf_adapter_in_flight", (("kind", "fusion"),))] == 1
    assert not [k for k in got if k[0].endswith("_created")]
    now[0] = 11.0  # r1 and r2 silent past the staleness bound: dead; their counts stay
    router.replicas.add("r3", ReplicaMetrics().changes())
    got = _scrape(router.registry)
    assert got[("icmf_adapter_in_flight", (("kind", "fusion"),))] == 0
    assert got[("icmf_adapter_cache_events_total", (("event", "hit"),))] == 3
    router.count("/v1/completions", 404)
    assert (
        _scrape(router.registry)[("icmf_requests_total", (("route", "/v1/completions"), ("status", "404")))]
        == 1
    )


def test_readme_lists_the_metrics_as_prometheus_sees_them():
    from pathlib import Path

    from serve import metrics

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name in metrics.scraped_names():
        assert f"`{name}" in readme, name


# ---------------------------------------------------------------- 8. OpenAI parameters
@pytest.mark.parametrize(
    "field", ["logprobs", "best_of", "logit_bias", "suffix", "frequency_penalty", "foo", "NO_OP"]
)
def test_unsupported_parameters_are_a_400_naming_them(field):
    from serve.app import ApiError, parse_completion_body

    value = {"logprobs": 2, "best_of": 3, "logit_bias": {"5": 1}, "suffix": "x"}.get(field, 0.5)
    body = json.dumps({"model": "base", "prompt": "a", field: value}).encode()
    with pytest.raises(ApiError) as info:
        parse_completion_body(body)
    assert info.value.status == 400 and field in str(info.value)


def test_sampling_parameters_are_accepted_and_defaults_are_harmless():
    from serve.app import parse_completion_body

    body = parse_completion_body(
        json.dumps(
            {
                "model": "base",
                "prompt": "a",
                "temperature": 0.7,
                "top_p": 0.9,
                "seed": 3,
                "stop": ["\n"],
                "logprobs": None,
                "n": 1,
                "presence_penalty": 0,
                "user": "me",
            }
        ).encode()
    )
    assert body.sampling() == {"temperature": 0.7, "top_p": 0.9, "seed": 3}
    assert body.stop_list() == ["\n"]


def test_stop_matcher_holds_back_partial_matches():
    from serve.app import StopMatcher

    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.feed("abc E") == ("abc ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("Dxyz") == ("", True)
    matcher = StopMatcher(["END"])
    assert matcher.feed("abE") == ("ab", False)
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.flush() == ""
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy():
    from serve.host import MultiLoraHost
    from tests.helpers import tiny_llama

    host = MultiLoraHost(tiny_llama(), eos_token_id=2, pad_token_id=0)
    prompt = [[1, 5, 9, 12]]
    greedy = host.generate(prompt, ["__base__"], [12], [True])
    hot = {"temperature": 5.0, "top_p": 1.0, "seed": 7}
    a = host.generate(prompt, ["__base__"], [12], [True], sampling=[hot])
    b = host.generate(prompt, ["__base__"], [12], [True], sampling=[hot])
    c = host.generate(prompt, ["__base__"], [12], [True], sampling=[{**hot, "seed": 8}])
    assert a == b and a != greedy and a != c
    cold = host.generate(prompt, ["__base__"], [12], [True], sampling=[{"temperature": 0.0, "seed": 1}])
    assert cold == greedy
    narrow = host.generate(prompt, ["__base__"], [12], [True], sampling=[{**hot, "top_p": 1e-6}])
    assert narrow == greedy  # top_p that keeps one token is greedy
    # a sample's draws do not depend on what it is batched with
    mixed = host.generate(prompt * 2, ["__base__"] * 2, [12, 12], [True, True], sampling=[hot, None])
    assert mixed == [a[0], greedy[0]]


def test_chat_prompt_needs_a_chat_template():
    from serve.app import ApiError, chat_prompt_ids

    class NoTemplate:
        pass

    with pytest.raises(ApiError) as info:
        chat_prompt_ids(NoTemplate(), [{"role": "user", "content": "hi"}])
    assert info.value.status == 404 and "chat template" in str(info.value)


def test_chat_prompt_uses_the_tokenizer_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.tasks.tokenizers import HFTokenizer
    from serve.app import chat_prompt_ids

    words = ["<unk>", "</s>", "<user>", "<assistant>", "hello", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(tmp_path)
    ids = chat_prompt_ids(HFTokenizer(tmp_path), [{"role": "user", "content": "hello there"}])
    assert ids == [2, 4, 5, 3]
