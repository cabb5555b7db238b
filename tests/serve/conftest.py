"""Fixtures for the serving tests: the lab's tiny generative suite served once per session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import SERVE_TOKEN, save_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PORT = 18765  # not Serve's default 8000: other local servers may hold it
CACHE_SIZE = 3  # smaller than the load test's working set: evictions happen


@pytest.fixture(scope="session")
def serve_lab(tmp_path_factory):
    """``(generative suite dict, catalog)`` of a tiny generative lab, plus a ``noise`` adapter.

    The tiny lab's adapters barely move the under-trained base, so an adapter-vs-base mix-up
    could pass unnoticed; the ``noise`` adapter (large random LoRA weights) changes every output.
    """
    from benchmarks.lab.__main__ import main
    from benchmarks.lab.manifest import load_lab
    from engine.catalog.catalog import Catalog

    out = tmp_path_factory.mktemp("serve-lab") / "tiny"
    args = [
        "build",
        "--suite",
        "generative",
        "--size",
        "tiny",
        "--out",
        str(out),
        "--quiet",
        "--workers",
        "0",
    ]
    assert main(args) == 0
    suite = load_lab(out)["suites"]["generative"]
    catalog = Catalog(suite["catalogs"]["main"]["uri"])
    noise_dir = _noise_adapter(suite["base_model"]["path"], tmp_path_factory.mktemp("noise") / "noise")
    catalog.ingest([noise_dir], task="noise")
    return suite, catalog


def _noise_adapter(base_path: str, out: Path) -> Path:
    from benchmarks.lab.generative import TARGET_MODULES, load_base

    def amplify(model):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(20.0)

    return save_lora(load_base(base_path), out, seed=123, train=amplify, target_modules=list(TARGET_MODULES))


def serve_args(suite: dict, catalog) -> dict:
    base = suite["base_model"]["path"]
    return {
        "catalog": catalog.uri,
        "base_model": base,
        "tokenizer": suite["tokenizer"]["path"],
        "base_aliases": [suite["base_model"]["id"]],
        "cache_size": CACHE_SIZE,
        "negative_ttl_s": 2.0,
        "fingerprint_check_s": 1.0,  # the background re-hash runs during the tests
        "auth_token": SERVE_TOKEN,
        "auth_token_env": None,
        "limits": {"max_prompt_chars": 64, "max_tokens": 16, "max_body_bytes": 8192},
    }


@pytest.fixture(scope="module")
def served(ray_session, serve_lab):
    """The application running on 127.0.0.1:PORT; Serve is shut down after the module.

    Module scope, not session: the replicas hold the session cluster's CPUs, and later tests
    (Ray Data, Ray Train) would wait for them forever.
    """
    from ray import serve

    from serve.app import build_app

    suite, catalog = serve_lab
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    start = time.perf_counter()
    serve.run(build_app(serve_args(suite, catalog)), name="icmf", route_prefix="/")
    print(f"serve app up in {time.perf_counter() - start:.1f}s")
    yield {"url": f"http://127.0.0.1:{PORT}", "suite": suite, "catalog": catalog}
    serve.shutdown()
    _wait_for_free_cpus(ray_session)


def _wait_for_free_cpus(ray, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"Serve left CPUs taken: {ray.available_resources()}"
        time.sleep(0.5)
