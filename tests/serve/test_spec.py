"""Fusion spec canonicalisation and the ``model`` field's rules (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.config import ServeConfig, ServeConfigError, load_serve_file
from serve.spec import ModelFieldError, parse_model_field


def spec(**fields) -> str:
    return json.dumps(fields)


def test_same_fusion_written_two_ways_gets_one_id():
    a = parse_model_field(spec(method="linear", tasks=["copy", "reverse"], weights=[0.3, 0.7]))
    b = parse_model_field(spec(weights=[0.7, 0.3], tasks=["reverse", "copy"], method="LINEAR"))
    assert a.kind == "fusion" and a.model_id == b.model_id and a.model_id.startswith("fused-")
    assert a.spec["tasks"] == ["copy", "reverse"] and a.spec["weights"] == [0.3, 0.7]


def test_uniform_weights_are_explicit_and_different_specs_differ():
    uniform = parse_model_field(spec(method="linear", tasks=["a", "b"]))
    explicit = parse_model_field(spec(method="linear", tasks=["a", "b"], weights=[0.5, 0.5]))
    other = parse_model_field(spec(method="ties", tasks=["a", "b"]))
    assert uniform.model_id == explicit.model_id != other.model_id


def test_support_selection_is_in_the_id_only_when_turned_off():
    default = parse_model_field(spec(method="iso_c", tasks=["a", "b"]))
    on = parse_model_field(spec(method="iso_c", tasks=["a", "b"], support_selection=True))
    off = parse_model_field(spec(method="iso_c", tasks=["a", "b"], support_selection=False))
    assert "support_selection" not in default.spec and off.spec["support_selection"] is False
    assert default.model_id == on.model_id != off.model_id
    with pytest.raises(ModelFieldError):
        parse_model_field(spec(method="iso_c", tasks=["a", "b"], support_selection="maybe"))


def test_base_adapter_and_aliases():
    assert parse_model_field("base").kind == "base"
    assert parse_model_field("lab/tiny", base_aliases=("lab/tiny",)).kind == "base"
    target = parse_model_field("copy-0123abcd")
    assert (target.kind, target.model_id) == ("adapter", "copy-0123abcd")


@pytest.mark.parametrize(
    "model, status",
    [
        ("../../etc/passwd", 422),
        ("/abs/path", 422),
        ("s3://bucket/adapter", 422),
        ("http://evil/adapter", 422),
        ("", 400),
        ("{not json", 400),
        (spec(method="linear"), 422),  # neither adapters nor tasks
        (spec(method="linear", tasks=["a"], adapters=["b"]), 422),
        (spec(method="linear", tasks=["../x"]), 422),
        (spec(method="linear", tasks=["a", "a"]), 422),
        (spec(method="linear", tasks=["a", "b"], weights=[1.0]), 422),
        (spec(method="linear", tasks=["a"], extra=1), 422),
        (spec(method="../m", tasks=["a"]), 422),
        ("x" * 5000, 400),
    ],
)
def test_malformed_model_fields_are_refused_with_a_status(model, status):
    with pytest.raises(ModelFieldError) as info:
        parse_model_field(model)
    assert info.value.status == status


def test_config_lists_every_fault_at_once(tmp_path):
    with pytest.raises(ServeConfigError) as info:
        ServeConfig.from_args(
            {
                "catalog": str(tmp_path / "none"),
                "cache_size": 0,
                "batching": "x",
                "icm_cache_mib": -1,
                "health_check_period_s": 0,
                "health_check_timeout_s": -1,
            }
        )
    message = str(info.value)
    faults = ("base_model", "tokenizer", "cache_size", "batching", "icm_cache_mib", "health_check_period_s")
    for fault in (*faults, "health_check_timeout_s"):
        assert fault in message
    with pytest.raises(ServeConfigError) as info:
        ServeConfig.from_args({"catalog": "/no/cat", "base_model": "/no/base", "tokenizer": "/no/tok"})
    assert all(f"{name}: /no/" in str(info.value) for name in ("catalog", "base_model", "tokenizer"))


def test_token_from_env_wins(monkeypatch, tmp_path):
    config = ServeConfig.from_args(
        {"catalog": "c", "base_model": "b", "tokenizer": "t", "auth_token": "cfg"}, check_paths=False
    )
    assert config.resolved_token() == "cfg"
    assert config.icm_cache_mib == 256  # per-replica icm input encodings on by default
    monkeypatch.setenv("ICMF_SERVE_TOKEN", "env")
    assert config.resolved_token() == "env"


def test_example_config_file_parses(monkeypatch):
    path = Path(__file__).parents[2] / "serve" / "configs" / "lab.yaml"
    http, config = load_serve_file(path, check_paths=False)
    assert http["host"] == "127.0.0.1" and config.batching == "mixed" and config.auth_token is None


def test_icmf_serve_check_validates_the_file(tmp_path, capsys):
    from engine.cli.main import main

    assert main(["serve", str(Path(__file__).parents[2] / "serve" / "configs" / "lab.yaml"), "--check"]) in (
        0,
        1,
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - args: {catalog: /nowhere, cache_size: -1}\n")
    assert main(["serve", str(bad), "--check"]) == 1
    err = capsys.readouterr().err
    assert all(word in err for word in ("cache_size", "base_model", "tokenizer"))


def test_files_that_exist_but_cannot_be_served_fail_on_the_driver(tmp_path):
    """A replica would fail on them at start-up, and Serve would restart it again and again."""
    for name in ("base", "fvae"):
        (tmp_path / name).mkdir()
    (tmp_path / "tok.json").write_text('{"format": "something-else"}')
    args = {
        "catalog": str(tmp_path),  # a directory, but no catalog in it
        "base_model": str(tmp_path / "base"),
        "tokenizer": str(tmp_path / "tok.json"),
        "fvae": str(tmp_path / "fvae"),
    }
    with pytest.raises(ServeConfigError) as info:
        ServeConfig.from_args(args)
    message = str(info.value)
    for fault in ("base_model: ", "is not a model directory", "tokenizer: ", "fvae: ", "cannot be loaded"):
        assert fault in message, message
