"""End to end on the session's local Ray: the official ``openai`` client against the served lab."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serve.conftest import TOKEN

pytestmark = [pytest.mark.ray, pytest.mark.slow]
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

    from benchmarks.lab.chartok import CharTokenizer
    from benchmarks.lab.generative import load_base

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


def post_raw(served, body: bytes, token=TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(
        served["url"] + "/v1/completions",
        data=body,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


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
    from serve.host import LoraHost, load_causal_lm

    base_path = served["suite"]["base_model"]["path"]
    pristine = LoraHost(load_causal_lm(base_path), eos_token_id=2, pad_token_id=0).base_fingerprint()
    for adapter in adapter_ids(served):  # more adapters than the cache holds: loads and evictions
        complete(served, adapter, max_tokens=2)
    health = get_json(served, "/healthz")
    assert health["base_fingerprint"] == pristine
    assert health["cache"]["stats"]["evictions"] > 0
    assert len(health["cache"]["cached"]) <= health["cache"]["capacity"]


def _workload(served, n: int) -> list[str]:
    ids = adapter_ids(served)
    specs = [
        json.dumps({"method": "task_arithmetic", "tasks": ["copy", "reverse"], "weights": [0.5, 0.5]}),
        json.dumps({"method": "task_arithmetic", "adapters": ids[:2]}),
    ]
    models = [*ids, *specs, "base"]
    assert len(models) >= 8
    return [models[i % len(models)] for i in range(n)]


def _run_load(served, models: list[str], concurrency: int = 8) -> list[BaseException | str]:
    c = client(served)

    def one(model):
        try:
            return c.completions.create(model=model, prompt=PROMPT, max_tokens=3).choices[0].text
        except Exception as exc:  # collected, asserted on by the caller
            return exc

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
    stats = get_json(served, "/healthz")["cache"]["stats"]
    assert stats["evictions"] > 0 and stats["hits"] > 0


def _model_replica_actor():
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterModel" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def test_replica_killed_mid_load_is_restarted(served):
    import ray

    models = _workload(served, 48)
    with ThreadPoolExecutor(1) as background:
        running = background.submit(_run_load, served, models, 8)
        time.sleep(1.0)
        ray.kill(_model_replica_actor(), no_restart=True)
        during = running.result(timeout=240)
    # requests in flight when the replica died may fail; none may hang, and each answered
    assert len(during) == len(models)
    deadline = time.monotonic() + 120
    while True:  # Serve notices the death and starts a new replica
        try:
            if get_json(served, "/healthz")["status"] == "ok":
                break
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline, "the model replica did not come back"
        time.sleep(1.0)
    after = _run_load(served, _workload(served, 24))
    assert not [r for r in after if isinstance(r, BaseException)]
