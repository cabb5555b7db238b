"""A path means what it means where the user wrote it (README, "Paths"): relative to the current
directory on the command line and in Python, relative to the file inside a YAML, and absolute (or
``catalog:PATH``) once stored, so Ray workers in other directories read the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.catalog import Catalog
from engine.demo.tasks import demo_model_spec, write_demo_examples
from engine.meta.config import load_config
from engine.tasks import TaskDefinition, save_task
from engine.tasks.examples import examples_uri, load_task_examples
from engine.tasks.store import load_task
from serve.config import load_serve_file


def test_a_relative_catalog_uri_is_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalog = Catalog("catalog")
    assert catalog.uri == str(tmp_path / "catalog") == catalog.root
    assert Catalog("s3://bucket/prefix?endpoint_override=localhost:1").uri.startswith("s3://")


def test_a_stored_task_definition_keeps_the_files_the_user_meant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_demo_examples("data/copy.jsonl", "copy", 40)
    catalog = Catalog("catalog")
    spec = demo_model_spec()
    save_task(catalog, TaskDefinition(name="copy", model=spec, examples="data/copy.jsonl", split={"eval": 8}))
    stored = load_task(catalog, "copy")
    assert stored.examples == str(tmp_path / "data" / "copy.jsonl")
    monkeypatch.chdir(tmp_path / "data")  # another directory, as a Ray worker has
    assert load_task_examples(stored, Catalog(str(tmp_path / "catalog"))).eval.num_rows == 8


def test_catalog_relative_examples_are_read_under_the_catalog_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    catalog = Catalog("catalog")
    write_demo_examples(tmp_path / "catalog" / "examples" / "copy.jsonl", "copy", 40)
    definition = TaskDefinition(
        name="copy", model=demo_model_spec(), examples="catalog:examples/copy.jsonl", split={"eval": 8}
    )
    save_task(catalog, definition)
    stored = load_task(catalog, "copy")
    assert stored.examples == "catalog:examples/copy.jsonl"  # kept as written, on purpose
    assert examples_uri(stored, catalog) == str(tmp_path / "catalog" / "examples" / "copy.jsonl")
    assert load_task_examples(stored, catalog).eval.num_rows == 8


def test_training_yaml_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    config = tmp_path / "project" / "train.yaml"
    config.write_text("catalog: catalog\nout: runs/fvae\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    cfg = load_config("project/train.yaml")
    assert cfg.catalog == str(tmp_path / "project" / "catalog")
    assert cfg.out == str(tmp_path / "project" / "runs" / "fvae")
    assert load_config({"catalog": "s3://bucket/c", "out": "o"}).catalog == "s3://bucket/c"
    assert load_config({"catalog": "c", "out": "o"}).out == str(tmp_path / "o")


def test_serve_yaml_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "deploy"
    for name in ("catalog", "base"):
        (folder / name).mkdir(parents=True)
    (folder / "tok.json").write_text(json.dumps({}))
    (folder / "serve.yaml").write_text(
        "applications:\n  - args: {catalog: catalog, base_model: base, tokenizer: tok.json}\n"
    )
    monkeypatch.chdir(tmp_path)
    _, config = load_serve_file(Path("deploy/serve.yaml"), check_paths=False)
    assert config.catalog == str(folder / "catalog") and config.tokenizer == str(folder / "tok.json")
    assert not config.missing_paths()


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_the_demo_serve_config_names_absolute_paths(tmp_path, monkeypatch, where):
    from engine.demo.run import write_serve_config

    monkeypatch.chdir(tmp_path)
    workdir = Path("icmf-demo") if where == "relative" else tmp_path / "icmf-demo"
    workdir.mkdir()
    path = write_serve_config(workdir, Catalog(workdir / "catalog"), workdir / "fvae").resolve()
    monkeypatch.chdir(tmp_path / "icmf-demo")  # read from elsewhere
    _, config = load_serve_file(path, check_paths=False)
    for value in (config.catalog, config.base_model, config.tokenizer, config.fvae):
        assert Path(value).is_absolute() and value.startswith(str(tmp_path / "icmf-demo"))
