"""``icmf serve CONFIG``: run the Ray Serve application of a Serve config file (serve/configs/)."""

from __future__ import annotations

import argparse
import time

from engine._output import console


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve the base model with LoRA adapters over an OpenAI-compatible API (Ray Serve)",
        description="Start the application in CONFIG (the same file `serve run` takes) and block "
        "until interrupted. Connects to RAY_ADDRESS if set, else starts a local Ray.",
    )
    parser.add_argument("config", help="Serve config YAML (e.g. serve/configs/lab.yaml)")
    parser.add_argument("--host", help="HTTP host (default: the file's http_options.host or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the file's http_options.port or 8000)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from serve.config import load_serve_file

    http, config = load_serve_file(args.config)  # every fault listed before Ray starts
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    if args.check:
        console.print(f"{args.config}: valid (catalog {config.catalog}, cache {config.cache_size})")
        return 0
    import yaml
    from ray import serve

    from engine._ray import ensure_ray
    from serve.app import build_app

    with open(args.config) as handle:
        app_entry = yaml.safe_load(handle)["applications"][0]
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        build_app(config.model_dump()),
        name=app_entry.get("name", "icmf"),
        route_prefix=app_entry.get("route_prefix", "/"),
    )
    auth = "bearer token required" if config.resolved_token() else "no auth"
    console.print(f"[bold]serving[/bold] http://{host}:{port}/v1 ({auth}); Ctrl-C to stop", markup=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
