"""``icmf submit`` and ``icmf jobs``: run icmf commands on a Ray cluster through the Jobs API."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

from engine._output import console, err_console, print_json

EPILOG = """examples:
  icmf submit --address http://HEAD:8265 --working-dir . --wait -- icmf train train.yaml
  icmf jobs ls --address http://HEAD:8265
  icmf jobs logs raysubmit_XYZ --follow --address http://HEAD:8265

--address defaults to $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS (as Ray's own `ray job` does)."""


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        metavar="URL",
        help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = commands.add_parser(
        "submit",
        help="run an icmf command on a Ray cluster as a job",
        description="Submit `icmf ...` (given after --) as a Ray job; with --wait, follow its logs "
        "and exit with the job's exit status.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    _add_address(p)
    p.add_argument("--working-dir", metavar="DIR", help="upload DIR (e.g. .) as the job's working directory")
    p.add_argument("--runtime-env", metavar="YAML", help="runtime_env file, e.g. clusters/runtime_env.yaml")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    p.add_argument("--submission-id", metavar="ID", help="job id to use (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N", help="GPUs reserved for the driver")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's exit status")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- icmf ...", help="the icmf command to run")
    p.set_defaults(func=submit)

    p = commands.add_parser(
        "jobs", help="list, inspect, follow or stop Ray jobs", epilog=EPILOG, formatter_class=fmt
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list the cluster's jobs")
    _add_address(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=jobs_ls)
    status = actions.add_parser("status", help="a job's status; exit status 0/1/130 once it has ended")
    status.add_argument("job_id", metavar="JOB_ID")
    _add_address(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=jobs_status)
    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id", metavar="JOB_ID")
    _add_address(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    logs.set_defaults(func=jobs_logs)
    stop = actions.add_parser("stop", help="stop a job")
    stop.add_argument("job_id", metavar="JOB_ID")
    _add_address(stop)
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    stop.set_defaults(func=jobs_stop)


def _client(args):
    from engine.jobs import JobsClient

    return JobsClient(args.address)


def _write_raw(chunk: str) -> None:
    # Logs are the job's own bytes: written as they are, never through rich markup.
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _follow(client, job_id: str) -> int:
    try:
        final = client.follow(job_id, _write_raw)
    except KeyboardInterrupt:
        err_console.print(
            f"stopped following; job {job_id} keeps running on the cluster. Follow it with "
            f"`icmf jobs logs {job_id} --follow`, stop it with `icmf jobs stop {job_id}`",
            markup=False,
        )
        return 130
    style = "green" if final["exit_status"] == 0 else "red"
    err_console.print(f"[{style}]job {job_id} {final['status']}[/] (exit status {final['exit_status']})")
    if final["status"] == "FAILED" and final["message"]:
        err_console.print(final["message"], markup=False)
    return int(final["exit_status"])


def submit(args) -> int:
    from engine.cli.main import build_parser
    from engine.jobs import build_entrypoint, build_runtime_env
    from engine.jobs.runtime_env import load_runtime_env, parse_env_vars

    # checked locally with the CLI's own parser, before the cluster is contacted
    entrypoint = build_entrypoint(args.command, build_parser())
    base = load_runtime_env(args.runtime_env) if args.runtime_env else None
    runtime_env = build_runtime_env(base, args.working_dir, parse_env_vars(args.env))
    client = _client(args)
    job_id = client.submit(
        entrypoint,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        metadata={"submitted_by": "icmf"},
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    err_console.print(f"submitted job {job_id} to {client.address}: {entrypoint}", markup=False)
    console.print(job_id, markup=False)
    if not args.wait:
        return 0
    return _follow(client, job_id)


def _when(timestamp_ms: int | None) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if timestamp_ms else "-"


def _duration(job: dict) -> str:
    if not job["start_time"]:
        return "-"
    end = job["end_time"] or datetime.now().timestamp() * 1000
    return f"{(end - job['start_time']) / 1000:.0f} s"


def jobs_ls(args) -> int:
    from rich.table import Table

    jobs = _client(args).list()
    if args.json:
        print_json(jobs)
        return 0
    table = Table("job", "status", "started", "took", "entrypoint")
    for job in jobs:
        table.add_row(
            job["submission_id"] or job["job_id"],
            job["status"],
            _when(job["start_time"]),
            _duration(job),
            job["entrypoint"],
        )
    console.print(table)
    return 0


def jobs_status(args) -> int:
    job = _client(args).status(args.job_id)
    if args.json:
        print_json(job)
    else:
        console.print(f"{args.job_id}: {job['status']} ({_duration(job)})", markup=False)
        if job["message"]:
            console.print(job["message"], markup=False)
    return job["exit_status"] or 0


def jobs_logs(args) -> int:
    client = _client(args)
    if args.follow:
        return _follow(client, args.job_id)
    _write_raw(client.logs(args.job_id))
    return 0


def jobs_stop(args) -> int:
    client = _client(args)
    stopped = client.stop(args.job_id)
    if not stopped:
        console.print(f"job {args.job_id} had already ended", markup=False)
        return 0
    if args.wait:
        final = client.wait(args.job_id)
        console.print(f"job {args.job_id} {final['status']}", markup=False)
    else:
        console.print(f"asked job {args.job_id} to stop", markup=False)
    return 0
