"""End to end on the session's local Ray: the official ``openai`` client against the served lab."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import SERVE_TOKEN as TOKEN

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.lab]
PROMPT = "copy:planet="


def client(served, token=TOKEN):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=token, max_retries=0, timeout=180)


def complete(served, model, prompt=PROMPT, max_tokens=8, **kwargs) -> str:
    return (
        client(served)
        .completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **kwargs)
        .choices[0]
        .text
    )


def adapter_ids(served, task=None) -> list[str]:
    return [e["id"] for e in served["catalog"].entries(task=task)]


def offline_greedy(served, adapter_dir, prompt=PROMPT, max_tokens=8) -> str:
    """The same adapter run offline: stock PEFT on a fresh base, ``generate`` with greedy decoding."""
    from peft import PeftModel

    from benchmarks.lab.generative import load_base
    from engine.tasks.chartok import CharTokenizer

    suite = served["suite"]
    tok = CharTokenizer.load(suite["tokenizer"]["path"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(suite["base_model"]["path"]), str(adapter_dir)).eval()
        ids = torch.tensor([tok.encode(prompt, add_bos=True)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :])


def get_json(served, path, token=TOKEN):
    request = urllib.request.Request(served["url"] + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def post_raw(served, body, token=TOKEN, path="/v1/completions", headers=None) -> tuple[int, dict]:
    """POST ``body`` (bytes, or an iterable of byte chunks: sent chunked); ``(status, JSON body)``.
    A reply that is not JSON fails the test."""
    request = urllib.request.Request(
        served["url"] + path,
        data=body,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sse_events(served, body: dict, token=TOKEN) -> tuple[int, list]:
    """A streamed completion over raw HTTP: ``(status, the data items, [DONE] as the string)``."""
    request = urllib.request.Request(
        served["url"] + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            lines = response.read().decode().split("\n\n")
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, [json.loads(exc.read())]
    items = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return status, [i if i == "[DONE]" else json.loads(i) for i in items]


def test_stored_adapter_matches_offline_peft_and_differs_from_base(served, tmp_path):
    noise = adapter_ids(served, "noise")[0]
    served_text = complete(served, noise)
    offline = offline_greedy(served, served["catalog"].export(noise, tmp_path / "noise"))
    assert served_text == offline
    assert served_text != complete(served, "base")  # the adapter really was applied


def test_base_aliases_and_bare_base(served):
    base = complete(served, "base")
    assert base and complete(served, served["suite"]["base_model"]["id"]) == base


def test_fusion_spec_matches_offline_fusion(served, tmp_path):
    from engine.fusion.api import fuse_from_catalog

    ids = [adapter_ids(served, "noise")[0], adapter_ids(served, "copy")[0]]
    spec = {"method": "task_arithmetic", "adapters": ids, "weights": [0.8, 0.2]}
    response = client(served).completions.create(model=json.dumps(spec), prompt=PROMPT, max_tokens=8)
    assert response.model.startswith("fused-")
    fused = fuse_from_catalog(served["catalog"], "task_arithmetic", adapter_ids=ids, weights=[0.8, 0.2])
    assert response.choices[0].text == offline_greedy(served, fused.save(tmp_path / "fused"))
    # the hashed id now names the same fusion, and /v1/models lists it
    assert complete(served, response.model) == response.choices[0].text
    listed = {m.id for m in client(served).models.list().data}
    assert {"base", response.model, *adapter_ids(served)} <= listed
    # a task-level spec (one adapter per task) works too, and gets its own id
    by_task = client(served).completions.create(
        model=json.dumps({"method": "cat", "tasks": ["copy", "reverse"]}), prompt=PROMPT, max_tokens=4
    )
    assert by_task.model.startswith("fused-") and by_task.model != response.model


def test_streaming_equals_the_whole_completion(served):
    noise = adapter_ids(served, "noise")[0]
    chunks = list(client(served).completions.create(model=noise, prompt=PROMPT, max_tokens=8, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == complete(served, noise)


def test_errors_are_4xx_json_with_a_reason(served):
    import openai

    c = client(served)
    cases = [
        ("copy-000000000000", openai.NotFoundError),
        (json.dumps({"method": "task_arithmetic", "tasks": ["no-such-task"]}), openai.NotFoundError),
        ("../../etc/passwd", openai.UnprocessableEntityError),
        ("{not json", openai.BadRequestError),
        (
            json.dumps({"method": "task_arithmetic", "tasks": ["copy"], "weights": [1, 2]}),
            openai.UnprocessableEntityError,
        ),
        (json.dumps({"method": "no-such-method", "tasks": ["copy"]}), openai.UnprocessableEntityError),
        (json.dumps({"method": "icm", "tasks": ["copy"]}), openai.UnprocessableEntityError),  # no F-VAE here
    ]
    for model, error in cases:
        with pytest.raises(error) as info:
            c.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert info.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="base", prompt=PROMPT, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        c.completions.create(model="base", prompt="x" * 1000, max_tokens=4)
    assert post_raw(served, b"not json")[0] == 400
    assert post_raw(served, b'{"model": "base"}')[0] == 422  # no prompt
    status, body = post_raw(served, b'{"model": "base", "prompt": "' + b"x" * 9000 + b'"}')
    assert status == 413 and "bytes" in body["error"]["message"]
    assert complete(served, "base")  # the replica keeps serving


def test_auth(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(served, token="wrong-token").completions.create(model="base", prompt=PROMPT, max_tokens=2)
    status, body = post_raw(served, b'{"model": "base", "prompt": "a"}', token=None)  # no header at all
    assert status == 401 and "bearer" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as info:
        get_json(served, "/v1/models", token="wrong")
    assert info.value.code == 401


def test_swaps_never_touch_the_base_weights(served):
    from serve.host import MultiLoraHost, load_causal_lm

    base_path = served["suite"]["base_model"]["path"]
    pristine = MultiLoraHost(load_causal_lm(base_path), eos_token_id=2, pad_token_id=0).base_fingerprint()
    for adapter in adapter_ids(served):  # more adapters than the cache holds: loads and evictions
        complete(served, adapter, max_tokens=2)
    health = get_json(served, "/status")
    assert health["base_fingerprint"] == pristine
    assert health["cache"]["stats"]["evictions"] > 0
    assert len(health["cache"]["cached"]) <= health["cache"]["capacity"]


# ---------------------------------------------------------------- issue 16, end to end
def test_deep_json_is_a_4xx_json_not_a_500(served):  # 1
    status, body = post_raw(served, b"[" * 50_000)
    assert status in (400, 413) and body["error"]["message"]
    status, body = post_raw(served, b"[" * 5000)
    assert status == 400 and "nest" in body["error"]["message"]
    deep_spec = '{"method":' + "[" * 2000 + "]" * 2000 + "}"
    status, body = post_raw(served, json.dumps({"model": deep_spec, "prompt": PROMPT}).encode())
    assert status == 422 and "nest" in body["error"]["message"]


def test_non_finite_or_huge_spec_numbers_are_422_every_time(served):  # 2
    bad = [
        '{"method": "task_arithmetic", "tasks": ["copy", "reverse"], "params": {"lam": NaN}}',
        '{"method": "task_arithmetic", "tasks": ["copy", "reverse"], "params": {"lam": -Infinity}}',
        json.dumps({"method": "task_arithmetic", "tasks": ["copy", "reverse"], "weights": [1e300, 1e300]}),
        json.dumps({"method": "ties", "tasks": ["copy", "reverse"], "weights": [1e30, 1e30]}),
    ]
    for model in bad:
        body = '{"model": ' + json.dumps(model) + ', "prompt": "' + PROMPT + '", "max_tokens": 2}'
        for _ in range(2):  # the second answer is the same 422, not a replayed 500
            status, answer = post_raw(served, body.encode())
            assert status == 422, (model, answer)
    # in bounds for the spec, but the fused factors overflow the serving bound: 422 after fusing
    ids = [adapter_ids(served, "noise")[0], adapter_ids(served, "copy")[0]]
    spec = {"method": "task_arithmetic", "adapters": ids, "weights": [100, 100], "params": {"lam": 1e6}}
    status, answer = post_raw(served, json.dumps({"model": json.dumps(spec), "prompt": PROMPT}).encode())
    assert status == 422 and "bounds" in answer["error"]["message"]


def test_chunked_body_over_the_limit_is_413(served):  # 3
    """4 MiB sent chunked, without Content-Length: refused with 413 once past the 8 KiB limit.

    The server may answer and close while the client is still sending (that is the point), so
    the body goes over a raw connection that tolerates a broken pipe."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(served["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.putrequest("POST", "/v1/completions")
    for key, value in (
        ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked"),
        ("Authorization", f"Bearer {TOKEN}"),
    ):
        connection.putheader(key, value)
    connection.endheaders()
    chunks, sent = 4096, 0
    try:
        for _ in range(chunks):
            connection.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
            sent += 1
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered before the body ended
    try:
        response = connection.getresponse()
    except ConnectionResetError:  # the answer was lost with the connection: cut off early, though
        assert sent < chunks
        return
    assert response.status == 413 and "bytes" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_healthz_is_open_and_says_nothing_else_needs_the_token(served):  # 5
    with urllib.request.urlopen(served["url"] + "/healthz", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    for path in ("/status", "/openapi.json", "/docs", "/v1/models", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(served["url"] + path, timeout=30)
        assert info.value.code == 401, path
    deadline = time.monotonic() + 60
    while True:  # the base weights are re-hashed on the replica's timer, not per request
        check = get_json(served, "/status")["base_fingerprint_check"]
        if check["checks"] >= 2:
            break
        assert time.monotonic() < deadline, check
        time.sleep(1)
    assert check["ok"] and check["every_s"] == 1.0
    assert "/v1/completions" in get_json(served, "/openapi.json")["paths"]


def test_sampling_seed_stop_and_unsupported_parameters(served):  # 8
    noise = adapter_ids(served, "noise")[0]
    kwargs = {"model": noise, "prompt": PROMPT, "max_tokens": 12}
    greedy = complete(served, **kwargs)
    hot = {"temperature": 2.0, "top_p": 1.0, "seed": 11}
    first, again = (complete(served, **kwargs, **hot) for _ in range(2))
    assert first == again
    assert len({first, complete(served, **kwargs, **{**hot, "seed": 12}), greedy}) >= 2
    assert complete(served, **kwargs, temperature=0) == greedy
    cut = greedy[2:4]
    stopped = client(served).completions.create(**kwargs, stop=[cut])
    assert stopped.choices[0].text == greedy[: greedy.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(client(served).completions.create(**kwargs, stop=[cut], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text
    for extra in ({"logprobs": 2}, {"n": 2}, {"frequency_penalty": 0.5}, {"made_up": 1}):
        status, body = post_raw(served, json.dumps({**kwargs, **extra}).encode())
        assert status == 400 and next(iter(extra)) in body["error"]["message"]


def test_chat_without_a_chat_template_is_404_json(served):  # 8
    status, body = post_raw(
        served,
        json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        path="/v1/chat/completions",
    )
    assert status == 404 and "chat template" in body["error"]["message"]


def scrape(served, token=TOKEN) -> dict[tuple[str, tuple], float]:
    """The app's ``GET /metrics`` as a user's Prometheus scrapes it: ``{(sample, labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(served["url"] + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settled_scrape(served) -> dict[tuple[str, tuple], float]:
    """A scrape once the model replicas' earlier work has been pushed (two scrapes a push period
    apart agree on every model-replica series)."""
    from serve.metrics import PUSH_PERIOD_S

    def replica_side(scraped):
        return {k: v for k, v in scraped.items() if k[0] != "icmf_requests_total"}

    deadline = time.monotonic() + 60
    previous = scrape(served)
    while True:
        time.sleep(1.5 * PUSH_PERIOD_S)
        current = scrape(served)
        if replica_side(current) == replica_side(previous):
            return current
        assert time.monotonic() < deadline, "the model replicas' metrics never settled"
        previous = current


def test_metrics_endpoint_counts_every_status_with_bounded_labels(served):  # 6
    from serve.metrics import scraped_names

    def requests(route, status):
        return ("icmf_requests_total", (("route", route), ("status", str(status))))

    with pytest.raises(urllib.error.HTTPError) as refused:  # behind the token like every route but /healthz
        urllib.request.urlopen(served["url"] + "/metrics", timeout=60)
    assert refused.value.code == 401
    before = settled_scrape(served)
    for i in range(3):  # distinct fusion ids: three loads, and no id may become a label value
        spec = {"method": "linear", "tasks": ["copy", "reverse"], "weights": [0.0123 * (i + 1), 0.5]}
        complete(served, json.dumps(spec), max_tokens=1)
    assert post_raw(served, b"not json")[0] == 400
    assert post_raw(served, json.dumps({"model": "no-such-id", "prompt": "a"}).encode())[0] == 404
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(served["url"] + "/no/such/path", timeout=60)
    assert unknown.value.code == 404
    deadline = time.monotonic() + 60
    while True:  # model replicas push their changes every 2 s
        after = scrape(served)
        gained = {k: v - before.get(k, 0.0) for k, v in after.items()}
        if gained.get(("icmf_batch_size_count", ()), 0) >= 3:
            break
        assert time.monotonic() < deadline, gained
        time.sleep(1)
    assert gained[requests("/v1/completions", 200)] == 3
    assert gained[requests("/v1/completions", 400)] == 1
    assert gained[requests("/v1/completions", 404)] == 1
    assert gained[requests("unmatched", 404)] == 1
    assert gained[requests("/metrics", 200)] >= 1  # the scrapes themselves
    assert after[requests("/metrics", 401)] >= 1
    assert gained[("icmf_adapter_cache_events_total", (("event", "miss"),))] == 3
    assert gained[("icmf_adapter_cache_events_total", (("event", "load"),))] == 3
    assert gained[("icmf_adapter_load_seconds_count", (("kind", "fusion"),))] == 3
    assert gained[("icmf_batch_size_count", ())] == 3
    names = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name, _ in after}
    assert {n for n in scraped_names() if "icm_inputs" not in n} <= names  # no F-VAE here
    kinds = {dict(labels)["kind"] for name, labels in after if name == "icmf_adapter_in_flight"}
    assert kinds == {"base", "stored", "fusion"}
    assert not [k for k in after if any("fused-" in v or "no/such" in v for _, v in k[1])]


def test_fuzzed_bodies_and_specs_get_json_4xx_or_200(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
        max_leaves=12,
    )
    names = st.sampled_from(["copy", "reverse", "noise"]) | st.text(max_size=10)
    spec = st.fixed_dictionaries(
        {
            "method": st.sampled_from(["linear", "task_arithmetic", "ties", "cat", "icm"])
            | st.text(max_size=8)
        },
        optional={
            "tasks": st.lists(names, max_size=3),
            "weights": st.lists(st.floats() | st.integers(), max_size=3),
            "params": st.dictionaries(st.sampled_from(["lam", "density", "rank", "x"]), values, max_size=2),
            "seed": values,
        },
    ).map(json.dumps)
    nested = st.integers(1, 3000).map(lambda n: '{"method":' + "[" * n + "]" * n + "}")
    model = st.just("base") | st.text(max_size=30) | spec | nested
    request = st.fixed_dictionaries(
        {"model": model | values, "prompt": st.text(max_size=70) | values},
        optional={
            "max_tokens": st.integers(-2, 20) | values,
            "temperature": st.floats() | values,
            "top_p": st.floats(),
            "seed": st.integers(),
            "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5),
            "logprobs": values,
            "extra": values,
        },
    ).map(lambda d: json.dumps(d).encode())
    raw = (
        st.binary(max_size=300)
        | values.map(lambda v: json.dumps(v).encode())
        | st.integers(1, 20_000).map(lambda n: b"[" * n)
    )

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(body=request | raw)
    def one(body):
        status, answer = post_raw(served, body)  # fails on a reply that is not JSON
        assert status == 200 or 400 <= status < 500, (status, answer, body[:300])
        if status >= 400:
            assert answer["error"]["message"]

    one()
    with urllib.request.urlopen(served["url"] + "/healthz", timeout=30) as response:
        assert response.status == 200
    assert complete(served, "base")


def _workload(served, n: int) -> list[str]:
    ids = adapter_ids(served)
    specs = [
        json.dumps({"method": "task_arithmetic", "tasks": ["copy", "reverse"], "weights": [0.5, 0.5]}),
        json.dumps({"method": "task_arithmetic", "adapters": ids[:2]}),
    ]
    models = [*ids, *specs, "base"]
    assert len(models) >= 8
    return [models[i % len(models)] for i in range(n)]


def _run_load(served, models: list[str], concurrency: int = 8, timed: bool = False) -> list:
    """Each request's text (or ``(text, seconds)`` when ``timed``), or the exception it raised."""
    c = client(served)

    def one(model):
        start = time.perf_counter()
        try:
            text = c.completions.create(model=model, prompt=PROMPT, max_tokens=3).choices[0].text
        except Exception as exc:  # collected, asserted on by the caller
            return exc
        return (text, time.perf_counter() - start) if timed else text

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, models))


def test_loopback_load_has_zero_errors(served):
    models = _workload(served, 200)
    start = time.perf_counter()
    results = _run_load(served, models)
    elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(set(models)) >= 8
    print(f"200 requests over {len(set(models))} models in {elapsed:.1f}s")
    stats = get_json(served, "/status")["cache"]["stats"]
    assert stats["evictions"] > 0 and stats["hits"] > 0


def _model_replica_actor():
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterModel" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def _stream_until(served, stop: threading.Event, outcomes: list) -> None:
    noise = adapter_ids(served, "noise")[0]
    body = {"model": noise, "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True}
    while not stop.is_set():
        try:
            outcomes.append(sse_events(served, body))
        except Exception as exc:  # a dropped connection: what this test forbids
            outcomes.append(exc)


def test_replica_killed_under_load_is_restarted_and_streams_end_cleanly(served):
    """SIGKILL of the model replica (ours: the only AdapterModel of this session's cluster) with
    whole requests and streams in flight: every request answers, every stream ends with
    ``[DONE]`` (finished, or an error event when its tokens had started), none is cut silently."""
    import ray

    models = _workload(served, 48)
    stop, outcomes = threading.Event(), []
    streams = [threading.Thread(target=_stream_until, args=(served, stop, outcomes)) for _ in range(3)]
    for thread in streams:
        thread.start()
    with ThreadPoolExecutor(1) as background:
        running = background.submit(_run_load, served, models, 8, True)
        time.sleep(1.0)
        killed_at = time.perf_counter()
        ray.kill(_model_replica_actor(), no_restart=True)
        during = running.result(timeout=240)
    deadline = time.monotonic() + 120
    while True:  # Serve notices the death and starts a new replica
        try:
            with urllib.request.urlopen(served["url"] + "/healthz", timeout=30) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline, "the model replica did not come back"
        time.sleep(0.5)
    back_after = time.perf_counter() - killed_at
    stop.set()
    for thread in streams:
        thread.join(timeout=120)
    # requests in flight when the replica died may fail (as JSON); none may hang
    assert len(during) == len(models)
    latencies = [r[1] for r in during if isinstance(r, tuple)]
    assert not [r for r in during if not isinstance(r, tuple)], during
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes[:3]
    cut = 0
    for status, items in outcomes:
        if status != 200:
            assert items[0]["error"]["message"]
            continue
        assert items[-1] == "[DONE]", items[-3:]
        last = items[-2]
        if "error" in last:
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    print(
        f"replica back after {back_after:.1f}s; slowest whole request {max(latencies):.1f}s; "
        f"{len(outcomes)} streams, {cut} closed with an error event"
    )
    after = _run_load(served, _workload(served, 24))
    assert not [r for r in after if isinstance(r, BaseException)]
