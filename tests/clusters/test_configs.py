"""``clusters/`` stays valid: launcher configs against the schema shipped inside ``ray``, KubeRay
manifests for the fields KubeRay requires, every ``icmf`` command through the real CLI parser,
embedded configs through their own validators, and versions in step with the installed packages."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

import engine
from engine.cli.main import build_parser
from engine.jobs.entrypoint import check_command
from engine.jobs.runtime_env import build_runtime_env, load_runtime_env
from engine.meta.config import load_config

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
LAUNCHER = sorted(CLUSTERS.glob("*.yaml"))
LAUNCHER = [p for p in LAUNCHER if "provider" in (yaml.safe_load(p.read_text()) or {})]
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def icmf_commands(text: str) -> list[list[str]]:
    """Every ``icmf ...`` command in a shell line (commands joined by &&, ||, ; or |)."""
    commands = []
    for part in re.split(r"&&|\|\||;|\|", text):
        words = shlex.split(part, comments=True)
        if words and words[0] == "icmf":
            commands.append(words)
    return commands


def test_the_expected_files_exist():
    names = {p.name for p in LAUNCHER} | {p.name for p in KUBERAY}
    assert {
        "aws-cpu.yaml",
        "aws-gpu.yaml",
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayservice.yaml",
    } <= names
    assert (CLUSTERS / "runtime_env.yaml").is_file() and (CLUSTERS / "Dockerfile").is_file()


# ------------------------------------------------------------------------------ cluster launcher
@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path):
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before it talks to the cloud: merge the provider's defaults and validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_runs_this_ray_and_installs_the_engine(path):
    config = yaml.safe_load(path.read_text())
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py"), (
        f"{path.name}: {image} is not Ray {ray.__version__}"
    )
    assert any("pip install" in c and "/home/ray/icm-fusion" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/icm-fusion"] == "."
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray start --head" in starts and "--dashboard-host=0.0.0.0" in starts


def test_a_cpu_and_a_gpu_cluster_are_defined():
    workers = {p.name: yaml.safe_load(p.read_text())["available_node_types"] for p in LAUNCHER}
    gpu_types = {"p4d.24xlarge", "p5.48xlarge", "g5.48xlarge", "g6.48xlarge"}
    instance_types = {
        name: {t["node_config"]["InstanceType"] for t in types.values()} for name, types in workers.items()
    }
    assert any(types & gpu_types for types in instance_types.values())
    assert any(not (types & gpu_types) for types in instance_types.values())


# ------------------------------------------------------------------------------ KubeRay
def ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpec(s) inside a RayCluster, RayJob or RayService (a KeyError is a fault)."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    return [spec["rayClusterConfig"]]


def check_pod_template(template: dict, where: str, faults: list[str]) -> None:
    containers = template.get("spec", {}).get("containers") or []
    if not containers:
        faults.append(f"{where}: template.spec.containers is empty")
    for c in containers:
        for key in ("name", "image"):
            if not c.get(key):
                faults.append(f"{where}: container without {key}")
        image = c.get("image", "")
        if not re.search(rf"/icm-fusion:{re.escape(engine.__version__)}(-gpu)?$", image):
            faults.append(f"{where}: image {image} is not icm-fusion {engine.__version__}")
        if not c.get("resources", {}).get("limits"):
            faults.append(f"{where}: container {c.get('name')} has no resource limits")


def cluster_spec_faults(spec: dict, where: str) -> list[str]:
    """What KubeRay requires of a RayClusterSpec (and what this project promises)."""
    faults = []
    if spec.get("rayVersion") != ray.__version__:
        faults.append(f"{where}: rayVersion {spec.get('rayVersion')} != installed Ray {ray.__version__}")
    head = spec.get("headGroupSpec") or {}
    groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    if not head:
        faults.append(f"{where}: headGroupSpec missing")
    for name, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict):
            faults.append(f"{where}/{name}: rayStartParams must be a mapping (may be empty)")
        elif any(not isinstance(v, str) for v in params.values()):
            faults.append(f"{where}/{name}: rayStartParams values must be strings")
        check_pod_template(group.get("template") or {}, f"{where}/{name}", faults)
    for name, group in groups[1:]:
        if not group.get("groupName"):
            faults.append(f"{where}: a worker group has no groupName")
        low, count, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if None in (low, count, high) or not low <= count <= high:
            faults.append(
                f"{where}/{name}: need minReplicas <= replicas <= maxReplicas, got {low}/{count}/{high}"
            )
    ports = {
        p.get("containerPort")
        for c in head.get("template", {}).get("spec", {}).get("containers", [])
        for p in c.get("ports", [])
    }
    if 8265 not in ports:
        faults.append(f"{where}: the head does not expose the Jobs API / dashboard port 8265")
    return faults


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_the_required_fields(path):
    docs = [d for d in documents(path) if d.get("kind") in RAY_KINDS]
    assert docs, f"{path.name}: no RayCluster/RayJob/RayService"
    faults = []
    for doc in docs:
        where = f"{path.name}:{doc['kind']}"
        if doc.get("apiVersion") != "ray.io/v1":
            faults.append(f"{where}: apiVersion must be ray.io/v1")
        if not doc.get("metadata", {}).get("name"):
            faults.append(f"{where}: metadata.name missing")
        if doc["kind"] == "RayJob" and not doc["spec"].get("entrypoint"):
            faults.append(f"{where}: spec.entrypoint missing")
        if doc["kind"] == "RayJob" and not (
            "rayClusterSpec" in doc["spec"] or "clusterSelector" in doc["spec"]
        ):
            faults.append(f"{where}: needs rayClusterSpec or clusterSelector")
        if doc["kind"] == "RayService" and not doc["spec"].get("serveConfigV2"):
            faults.append(f"{where}: spec.serveConfigV2 missing")
        for spec in ray_cluster_specs(doc):
            faults += cluster_spec_faults(spec, where)
    assert not faults, "\n".join(faults)


def test_rayjob_commands_parse_and_its_config_is_valid():
    docs = documents(CLUSTERS / "kuberay" / "rayjob-train.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    commands = icmf_commands(job["spec"]["entrypoint"])
    assert [c[1] for c in commands] == ["train", "fuse"]
    for command in commands:
        check_command(
            command, build_parser()
        )  # the real argparse parser: raises on any bad flag or subcommand
    # The config file the entrypoint names is the ConfigMap mounted on the head, and it validates.
    config_path = Path(commands[0][2])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(
        m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == config_path.parent
    )
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    cfg = load_config(yaml.safe_load(config_map["data"][config_path.name]))
    assert "://" in cfg.catalog and "://" in cfg.out, "job inputs and outputs must be object-store URIs"
    fuse = commands[1]
    assert fuse[fuse.index("--model") + 1] == cfg.out
    assert "://" in fuse[fuse.index("--out") + 1]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    ray.runtime_env.RuntimeEnv(**runtime_env)  # Ray's own validation of the keys
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serve_config_is_valid():
    doc = next(d for d in documents(CLUSTERS / "kuberay" / "rayservice.yaml") if d["kind"] == "RayService")
    from ray.serve.schema import ServeDeploySchema

    serve_config = ServeDeploySchema.parse_obj(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert [a.import_path for a in serve_config.applications] == ["serve.app:build_app"]


def test_rayservice_application_builds_from_its_args():
    """The import path resolves to serve's application builder and the args pass its config
    validation (paths are checked on the pods, not here)."""
    import importlib

    from serve.config import ServeConfig

    doc = next(d for d in documents(CLUSTERS / "kuberay" / "rayservice.yaml") if d["kind"] == "RayService")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    config = ServeConfig.from_args(app["args"], False)
    assert "://" in config.catalog and "://" in config.fvae
    ray.runtime_env.RuntimeEnv(**app["runtime_env"])


# ------------------------------------------------------------------------------ image and runtime env
def test_dockerfile_builds_on_this_ray_version():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-\$\{{VARIANT\}}$", text, re.M)
    for tag in re.findall(r"icm-fusion:([\w.\-]+)", text):
        assert tag.removesuffix("-gpu") == engine.__version__


def test_runtime_env_file_is_valid_for_ray_and_icmf_submit(tmp_path):
    env = build_runtime_env(load_runtime_env(CLUSTERS / "runtime_env.yaml"), str(tmp_path))
    ray.runtime_env.RuntimeEnv(**env)
    assert env["working_dir"] == str(tmp_path) and ".venv" in env["excludes"]
    assert not any(k.startswith("AWS_SECRET") for k in env["env_vars"]), "no credentials in files"


def test_icmf_commands_in_comments_parse():
    """Usage lines in the files' comments are commands users copy: they must parse too."""
    found = 0
    for path in [*LAUNCHER, *KUBERAY, CLUSTERS / "runtime_env.yaml"]:
        # Join continued comment lines ("\" at the end) into one command.
        text = re.sub(r"\\\n#\s*", " ", path.read_text())
        for line in re.findall(r"^#\s+(icmf .*)$", text, re.M):
            for command in icmf_commands(line):
                if command[1] == "submit":
                    command = command[command.index("--") + 1 :]
                check_command(command, build_parser())
                found += 1
    assert found >= 4
