"""A real pipeline on a two-node Ray cluster, submitted through the Jobs API with ``icmf submit``:
ingest PEFT adapters into a catalog on S3, meta-train the F-VAE on 2 Ray Train workers, fuse with
``icm``; every output lands in the object store, none only on a worker's disk."""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs
import pytest
import yaml

from engine.catalog import fs as cfs
from engine.cli.main import main
from engine.fvae.artifact import FVAEArtifact
from engine.jobs import JobsClient
from engine.jobs.client import STOPPED_EXIT
from tests.clusters.local_cluster import LocalCluster, free_port
from tests.helpers import make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.s3]

TASKS = ("copy", "reverse")
BUCKET = "icmf"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with one bucket; yields the AWS_* variables that point
    pyarrow (in this process and in every job process) at it."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], **_boto_auth(env)).create_bucket(
            Bucket=BUCKET
        )
        yield env
    finally:
        server.stop()


def _boto_auth(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_REGION"],
    }


@pytest.fixture(scope="module")
def cluster():
    # 3 logical CPUs per node and 2 per training worker: two workers cannot share a node, and each
    # node keeps a CPU for Ray Data's read tasks.
    cluster = LocalCluster(cpus_per_node=(3, 3)).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def workdir_with_inputs(root) -> None:
    """What a user would upload with --working-dir: PEFT adapters and the training config."""
    for t, task in enumerate(TASKS):
        for i in range(3):
            make_adapter(root / "adapters" / task / f"a{i}", seed=10 * t + i)
    config = {
        "catalog": f"s3://{BUCKET}/catalog",
        "out": f"s3://{BUCKET}/fvae",
        "fvae": {"depth": 5, "channels": 4, "max_channels": 8, "latent_dim": 16},
        "task_vectors": {"dim": 8},
        "train": {
            "steps": 10,
            "checkpoint_every": 10,
            "report_every": 5,
            "workers": 2,
            "cpus_per_worker": 2,
            "max_tasks": 2,
            "fusion_loss": "proxy",
            "max_failures": 0,
        },
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))


def submit(cluster, workdir, env, *command: str) -> int:
    flags = [f"--env={k}={v}" for k, v in env.items()]
    argv = ["submit", "--address", cluster.address, "--working-dir", str(workdir), *flags, "--wait"]
    return main([*argv, "--", "icmf", *command])


def test_ingest_train_fuse_pipeline_as_jobs_on_two_nodes(cluster, s3_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    workdir = tmp_path / "wd"
    workdir_with_inputs(workdir)
    catalog = f"s3://{BUCKET}/catalog"

    for task in TASKS:
        paths = [f"adapters/{task}/a{i}" for i in range(3)]  # relative: resolved in the job's working dir
        assert (
            submit(
                cluster, workdir, s3_env, "catalog", "ingest", *paths, "--catalog", catalog, "--task", task
            )
            == 0
        )
    assert submit(cluster, workdir, s3_env, "train", "train.yaml") == 0
    fused = f"s3://{BUCKET}/fused/copy+reverse"
    fuse = ["fuse", "--catalog", catalog, "--tasks", "copy,reverse", "--method", "icm"]
    assert submit(cluster, workdir, s3_env, *fuse, "--model", f"s3://{BUCKET}/fvae", "--out", fused) == 0
    logs = capsys.readouterr().out
    assert "F-VAE mlp (auto): " in logs  # the default arch, resolved for this catalog's size
    assert "[icmf train] step 10/10" in logs and "fused [" in logs  # the jobs' own output was streamed

    # Training ran on both nodes: Ray's state API remembers every (now dead) train worker actor.
    workers = [a for a in cluster.state("actors") if "TrainWorker" in a["class_name"]]
    assert len({a["node_id"] for a in workers}) >= 2, [(a["class_name"], a["node_id"]) for a in workers]
    assert len({n["node_id"] for n in cluster.nodes()}) == 2

    # Every artifact is in the object store.
    artifact = FVAEArtifact.load(f"s3://{BUCKET}/fvae")
    assert artifact.meta.workers == 2 and artifact.meta.steps == 10
    assert set(artifact.meta.tasks) == set(TASKS)
    fs, root = cfs.resolve_uri(fused)
    assert {"adapter_config.json", "adapter_model.safetensors", "icmf_provenance.json"} <= set(
        cfs.list_names(fs, root)
    )
    provenance = json.loads(cfs.read_bytes(fs, cfs.join(root, "icmf_provenance.json")))
    assert provenance["method"] == "icm" and {i["task"] for i in provenance["inputs"]} == set(TASKS)
    fs, root = cfs.resolve_uri(f"s3://{BUCKET}/fvae/runs")
    assert fs.get_file_info(pafs.FileSelector(root, recursive=True)), "checkpoints missing from S3"

    # The jobs API sees the four jobs, all succeeded, all submitted by icmf.
    assert main(["jobs", "ls", "--address", cluster.address, "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    ours = [j for j in jobs if j["metadata"].get("submitted_by") == "icmf"]
    assert [j["status"] for j in ours] == ["SUCCEEDED"] * 4


def test_failed_job_exit_status_and_logs(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    (tmp_path / "wd").mkdir()
    argv = ["submit", "--address", cluster.address, "--working-dir", str(tmp_path / "wd"), "--wait"]
    code = main([*argv, "--", "icmf", "train", "missing.yaml"])
    out, err = capsys.readouterr()
    assert code == 1 and "missing.yaml: no such config file" in out and "FAILED" in err
    job_id = out.split("\n", 1)[0].strip()
    assert main(["jobs", "status", job_id, "--address", cluster.address, "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "FAILED" and status["exit_status"] == 1
    assert main(["jobs", "logs", job_id, "--address", cluster.address]) == 0
    assert "no such config file" in capsys.readouterr().out


def test_stop_a_running_job(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    (tmp_path / "wd").mkdir()
    argv = ["submit", "--address", cluster.address, "--working-dir", str(tmp_path / "wd")]
    long_running = ["icmf", "catalog", "synth", "--catalog", str(tmp_path / "big"), "--n", "1000000"]
    assert main([*argv, "--", *long_running]) == 0  # without --wait: returns once submitted
    job_id = capsys.readouterr().out.strip()
    client = JobsClient(cluster.address)
    deadline = time.monotonic() + 120
    while client.status(job_id)["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["jobs", "stop", job_id, "--address", cluster.address, "--wait"]) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert main(["jobs", "status", job_id, "--address", cluster.address]) == STOPPED_EXIT
