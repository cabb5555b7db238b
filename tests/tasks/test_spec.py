"""Model specs and task definitions: validation lists every fault at once; JSON/YAML round trips."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.tasks import ModelSpec, SpecError, SplitSpec, TaskDefinition, load_model_spec
from engine.tasks.spec import infer_format, validate_spec
from tests.helpers import bert_spec_dict, custom_spec_dict


def faults_of(data, cls=ModelSpec) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(cls, data)
    return info.value.faults


@pytest.mark.parametrize("data", [bert_spec_dict(), custom_spec_dict()])
def test_valid_specs_round_trip_through_json(data):
    spec = load_model_spec(data)
    assert load_model_spec(json.loads(spec.model_dump_json())) == spec


def test_demo_spec_is_valid(demo_spec):
    assert demo_spec.kind == "causal_lm" and demo_spec.roles == ("prompt", "completion")


def test_every_fault_is_listed_at_once():
    faults = faults_of(
        {
            "kind": "causal_lm",
            "max_length": 0,  # field constraint
            "tokenzier": {"kind": "char"},  # typo: unknown field
            "factory": "pkg:make",  # not used by causal_lm (cross-field)
            # neither path nor config, no tokenizer (cross-field)
        }
    )
    text = "\n".join(faults)
    assert "max_length" in text
    assert "tokenzier: unknown field" in text
    assert "factory: not used by kind 'causal_lm'" in text
    assert "path/config: set exactly one" in text
    assert "tokenizer: required" in text
    assert len(faults) == 5


def test_nested_and_cross_field_faults_together():
    faults = faults_of(
        {
            "kind": "seq_cls",
            "path": "/m",
            "config": {"hidden_size": 8},  # both path and config; config lacks model_type
            "tokenizer": {"kind": "whitespace", "bos_token": "<s>", "add_eos": True},  # no vocab, no eos
            "num_labels": 1,  # < 2
        }
    )
    text = "\n".join(faults)
    for expected in (
        "num_labels",
        "path/config: set exactly one",
        "config.model_type: required",
        "tokenizer.vocab: required for kind 'whitespace'",
        "tokenizer.add_eos: is true but eos_token is not set",
    ):
        assert expected in text, expected


def test_vocab_faults():
    faults = faults_of(
        {
            "kind": "causal_lm",
            "config": {"model_type": "llama"},
            "tokenizer": {
                "kind": "char",
                "vocab": ["a", "a", "bc", "<pad>"],
                "pad_token": "<pad>",
                "unk_token": "?",
            },
        }
    )
    text = "\n".join(faults)
    assert "duplicate entries ['a']" in text and "not single characters" in text and "unk_token: '?'" in text


def test_custom_and_hf_rules():
    faults = faults_of({"kind": "custom", "factory": "no colon", "tokenizer": {"kind": "hf"}})
    text = "\n".join(faults)
    assert "factory: 'no colon' is not 'package.module:callable'" in text
    assert "tokenizer: not used by kind 'custom'" in text
    assert "tokenizer.path: required for kind 'hf'" in text
    assert "num_labels: required" in "\n".join(
        faults_of({"kind": "seq_cls", "config": {"model_type": "bert"}, "tokenizer": {"kind": "char"}})
    )


def test_yaml_file_with_relative_paths(tmp_path):
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "model.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {"kind": "causal_lm", "path": "../models/llama", "tokenizer": {"kind": "hf", "path": "tok"}}
        )
    )
    spec = load_model_spec(spec_file)
    assert spec.path == str(tmp_path / "models" / "llama")
    assert spec.tokenizer.path == str(tmp_path / "specs" / "tok")


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_model_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{kind: ")
    with pytest.raises(SpecError, match=r"(?s)bad\.json.*not valid JSON"):
        load_model_spec(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("kind: causal\n")
    with pytest.raises(SpecError, match=r"(?s)wrong\.yaml: .*kind: Input should be"):
        load_model_spec(wrong)


def test_task_definition_faults(demo_spec):
    faults = faults_of(
        {
            "name": "../etc",
            "model": demo_spec.model_dump(),
            "examples": "data/examples.txt",
            "fields": {"question": "q"},
            "split": {"eval": 1.5, "support": -1},
        },
        TaskDefinition,
    )
    text = "\n".join(faults)
    assert "name: '../etc' is invalid" in text
    assert "fields: unknown role(s) ['question']" in text
    assert "examples_format: cannot tell the format" in text
    assert "split.eval: fraction 1.5" in text
    assert "split.support" in text


def test_split_sizes():
    assert SplitSpec(eval=0.25, support=4).sizes(100) == (25, 4, 71)
    assert SplitSpec(eval=10, support=0, train=5).sizes(100) == (10, 0, 5)
    with pytest.raises(ValueError, match="cannot hold eval=10 \\+ support=16"):
        SplitSpec(eval=10).sizes(20)
    with pytest.raises(ValueError, match=r"split\.train=90"):
        SplitSpec(eval=10, support=0, train=90).sizes(20)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "json"),
        ("a.JSON", "json"),
        ("a.csv.gz", "csv"),
        ("s3://b/a.parquet", "parquet"),
        ("a.txt", None),
    ],
)
def test_infer_format(name, fmt):
    assert infer_format(name) == fmt
