"""Serving through a model-replica restart: how long whole requests stall after a SIGKILL, and where
the time goes.

Serves the lab's generative suite with one model replica (``--replicas``; one is the case where
a restart stalls requests), keeps one client sending non-streaming base completions back to back,
SIGKILLs a replica's process and records, per kill, seconds from the kill until

- ``new_actor``: Serve's controller has noticed the death and created the new replica actor;
- ``process_started``: the new worker process exists (its start time, from the OS);
- ``running``: Serve reports the new replica RUNNING (its ``__init__`` done: imports, model load);
- ``first_ok``: the first completion sent after the kill succeeds (what a client waits: the stall);
- ``slowest_request``: the longest any request around the kill took.

Every request must end 200: one that fails is an error in the result. The medians over
``--kills`` kills go to ``results/serve_restart.json`` (the label names the code/config measured).

    python -m benchmarks.serve_restart --lab DIR --kills 5 --label after
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, environment, write_json

PORT = 18767
APP = "icmf-restart"


def post_base(max_tokens: int = 4) -> int:
    body = {"model": "base", "prompt": "copy:planet=", "max_tokens": max_tokens}
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Client(threading.Thread):
    """Sends requests back to back; records ``(start, end, status)`` of each."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.log: list[tuple[float, float, int | str]] = []
        self.dead: set[str] = set()  # replicas killed so far

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.time()
            try:
                status: int | str = post_base()
            except Exception as exc:  # a dropped connection counts as a failure
                status = type(exc).__name__
            self.log.append((start, time.time(), status))


def model_replicas() -> list[str]:
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterModel" in a["name"]
    )


def replica_pid(name: str) -> int:
    import ray

    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=300)


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications[APP]
    states = app.deployments["AdapterModel"].replica_states
    return int(states.get("RUNNING", 0))


def one_kill(client: Client, replicas: int) -> dict[str, Any]:
    """SIGKILL one model replica and time the restart's stages (seconds after the kill)."""
    import psutil

    old = next(n for n in model_replicas() if n not in client.dead)
    known = set(model_replicas())
    pid = replica_pid(old)
    time.sleep(1.0)  # the client is in its steady state
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    marks: dict[str, float] = {}
    deadline = killed_at + 300
    new = None
    while "first_ok" not in marks or "running" not in marks:
        assert time.time() < deadline, f"no full recovery 300 s after the kill: {marks}"
        now = time.time() - killed_at
        fresh = [n for n in model_replicas() if n not in known]
        if "new_actor" not in marks and fresh:
            marks["new_actor"], new = now, fresh[0]
        if "new_actor" in marks and "running" not in marks and running_replicas() >= replicas:
            marks["running"] = now
        # a request sent after the kill (one answered just after it was computed before it)
        ok = [end for start, end, status in list(client.log) if start > killed_at and status == 200]
        if ok and "first_ok" not in marks:
            marks["first_ok"] = ok[0] - killed_at
        time.sleep(0.05)
    client.dead.add(old)  # Ray may list a dead replica's name for a while
    marks["process_started"] = psutil.Process(replica_pid(new)).create_time() - killed_at
    around = [(start, end, s) for start, end, s in client.log if end > killed_at]
    marks["slowest_request"] = max(end - start for start, end, _ in around)
    failures = [s for _, _, s in around if s != 200]
    return {k: round(v, 2) for k, v in marks.items()} | {"failed_requests": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lab", required=True, help="a lab folder (benchmarks.lab build ... --out DIR)")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (one is killed each time)")
    parser.add_argument("--label", default="current", help="names this run in the result file")
    parser.add_argument("--args", default="{}", help="JSON: extra serve config args (e.g. health checks)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from serve.app import build_app

    gen = Path(args.lab) / "generative"
    config = {
        "catalog": str(gen / "catalogs" / "main"),
        "base_model": str(gen / "base"),
        "tokenizer": str(gen / "base" / "char_tokenizer.json"),
        "auth_token_env": None,
        "num_replicas": args.replicas,
        **json.loads(args.args),
    }
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    loadavg_before = os.getloadavg()
    kills = []
    try:
        started = time.time()
        serve.run(build_app(config), name=APP, route_prefix="/")
        first_start_s = time.time() - started
        assert post_base() == 200
        client = Client()
        client.start()
        for i in range(args.kills):
            kills.append(one_kill(client, config["num_replicas"]))
            print(f"kill {i + 1}: {kills[-1]}", flush=True)
        client.stop.set()
        client.join(timeout=300)
    finally:
        serve.shutdown()
        ray.shutdown()
    stages = ("new_actor", "process_started", "running", "first_ok", "slowest_request")
    result = {
        "label": args.label,
        "serve_args": {k: v for k, v in config.items() if k not in ("catalog", "base_model", "tokenizer")},
        "first_deploy_s": round(first_start_s, 2),
        "kills": kills,
        "median_s": {k: round(statistics.median(x[k] for x in kills), 2) for k in stages},
        "failed_requests": sum(len(x["failed_requests"]) for x in kills),
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "environment": environment(),
    }
    out = Path(args.out)
    path = out / "serve_restart.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [r for r in runs if r["label"] != args.label] + [result]
    write_json("serve_restart", {"runs": runs}, out)
    print(json.dumps({k: result[k] for k in ("label", "median_s", "failed_requests", "loadavg_before")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
