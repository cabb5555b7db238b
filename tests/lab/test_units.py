"""Fast checks of the lab's pieces: tokenizer, splits, seeds, long-tail profile, example files."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from benchmarks.lab import encoder_tasks, generative_tasks
from benchmarks.lab.build import _longtail_pick, longtail_counts
from benchmarks.lab.config import SIZES, derive_seed
from benchmarks.lab.examples import prepare_encoder, prepare_generative, read_jsonl
from engine.tasks.chartok import CharTokenizer

pytestmark = pytest.mark.lab


def test_char_tokenizer_round_trip_and_save(tmp_path):
    tok = CharTokenizer()
    text = "reverse:café=éfac\n{x}"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "reverse:cafe=efac\n{x}"  # accents are dropped, nothing else is lost
    assert tok.decode(ids, skip_special_tokens=False).startswith("<bos>")
    assert tok.encode("☃") == [tok.unk_token_id]
    batch = tok(["ab", "abcd"], padding_side="left", return_tensors="pt")
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    path = tok.save(tmp_path)
    assert CharTokenizer.load(path) == tok == CharTokenizer.from_pretrained(tmp_path)
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a lab character tokenizer"):
        CharTokenizer.load(path)


def test_split_examples_balanced_disjoint_and_seeded():
    pool = [(f"w{i}", i % 3) for i in range(300)] + [("w0", 2)]  # a duplicate text keeps one label
    sizes = {"train": 60, "support": 12, "eval": 30}
    a = encoder_tasks.split_examples(pool, 3, sizes, random.Random(1))
    b = encoder_tasks.split_examples(pool, 3, sizes, random.Random(1))
    assert a == b
    assert a != encoder_tasks.split_examples(pool, 3, sizes, random.Random(2))
    texts = [set(t for t, _ in a[s]) for s in sizes]
    assert sum(map(len, texts)) == len(set().union(*texts))  # disjoint
    assert {s: len(v) for s, v in a.items()} == sizes
    assert set(Counter(y for _, y in a["eval"]).values()) == {10}


def test_split_examples_small_pool_shrinks_train_only():
    pool = [(f"w{i}", i % 2) for i in range(50)]
    out = encoder_tasks.split_examples(pool, 2, {"train": 100, "support": 10, "eval": 20}, random.Random(0))
    assert (len(out["support"]), len(out["eval"]), len(out["train"])) == (10, 20, 20)


def test_generative_tasks_conflict_on_the_same_input():
    outputs = {name: fn("letter") for name, fn in generative_tasks.TASKS.items()}
    assert outputs["reverse"] == "rettel" and outputs["dedupe"] == "letr" and outputs["sort"] == "eelrtt"
    assert outputs["shift"] == "mfuufs" and outputs["length"] == "6" and outputs["devowel"] == "lttr"
    assert len(set(outputs.values())) == len(outputs)
    assert generative_tasks.example("copy", "cat") == {"prompt": "copy:cat=", "completion": "cat"}


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "encoder", "t", 1) == derive_seed(0, "encoder", "t", 1)
    assert len({derive_seed(s, "x", i) for s in range(3) for i in range(50)}) == 150


def test_longtail_profile_is_geometric_and_seeded():
    tasks = [f"t{i}" for i in range(8)]
    counts = longtail_counts(tasks, 12, 1, seed=0, suite="encoder")
    assert sorted(counts.values(), reverse=True) == [12, 8, 6, 4, 3, 2, 1, 1]
    assert counts == longtail_counts(list(reversed(tasks)), 12, 1, seed=0, suite="encoder")
    main = [{"run": f"run{r}", "step": s} for r in range(3) for s in (50, 100)]
    picked = _longtail_pick(main, 4)
    assert [(m["run"], m["step"]) for m in picked] == [
        ("run0", 100),
        ("run1", 100),
        ("run2", 100),
        ("run0", 50),
    ]


@pytest.mark.parametrize("suite", ["encoder", "generative"])
def test_example_files_are_deterministic_per_seed(tmp_path, suite):
    size = SIZES["tiny"]
    prepare = prepare_encoder if suite == "encoder" else prepare_generative
    cfg = size.encoder if suite == "encoder" else size.generative
    a, b, c = (prepare(tmp_path / name, cfg, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for task in cfg.tasks:
        for split in a[task]:
            assert a[task][split].read_bytes() == b[task][split].read_bytes()
        assert read_jsonl(a[task]["eval"]) != read_jsonl(c[task]["eval"])


def test_features_suite_inputs_and_model_spec(tmp_path):
    """The ``features`` suite: deterministic, normalised word features, and its base reached by
    the engine's ``custom`` task model through the suite's model spec (factory + weights file)."""
    import torch
    from safetensors.torch import save_file

    from benchmarks.lab import features
    from benchmarks.lab.tasks import suite_model_spec
    from engine.tasks.base import task_model

    a, b = features.word_features("running"), features.word_features("running")
    assert a == b and len(a) == features.DIM
    assert sum(v * v for v in a) == pytest.approx(1.0, abs=1e-3)
    assert a != features.word_features("runner")
    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_file(features.FeatureMLP().state_dict(), path)
    suite = {
        "kind": features.KIND,
        "num_labels": features.NUM_LABELS,
        "base_model": {"path": str(path), "factory": "benchmarks.lab.features:base_model"},
    }
    model = task_model(suite_model_spec(suite))
    rows = [{"input": features.word_features(w), "label": i} for i, w in enumerate(["cat", "ran", "sad"])]
    metrics = model.metrics(model.build_base(), rows)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0


def test_char_tokenizer_file_is_read_one_way_by_training_task_models_and_the_server(tmp_path):
    """Training (the lab), task models (``tokenizer: {kind: char, path}``) and the server all read
    the file with :class:`CharTokenizer`: a prompt with accents gets the ids it was trained with."""
    from engine.tasks.errors import SpecError, TaskError
    from engine.tasks.spec import TokenizerSpec, validate_spec
    from engine.tasks.tokenizers import build_text_encoder, load_tokenizer

    path = CharTokenizer().save(tmp_path)
    trained = CharTokenizer.load(path).encode("café:", add_bos=True)
    assert trained == CharTokenizer().encode("cafe:", add_bos=True)
    assert load_tokenizer(path, "char").encode_with_specials("café:") == trained
    encoder = build_text_encoder(TokenizerSpec(kind="char", path=str(path), add_eos=True))
    assert encoder.prompt("café:") == trained
    assert encoder.completion("é") == [*CharTokenizer().encode("e"), encoder.tokenizer.eos_token_id]
    with pytest.raises(SpecError, match=r"vocab: not used by a tokenizer file \(path\)"):
        validate_spec(TokenizerSpec, {"kind": "char", "path": str(path), "vocab": ["a"]})
    with pytest.raises(TaskError, match="cannot load a character tokenizer"):
        load_tokenizer(tmp_path / "missing.json", "char")


def test_the_quality_table_has_a_row_for_every_registry_method():
    """fusion_quality's rows name registered methods with valid parameters, and no registry method
    is left out of the table (a method added to the registry must get a row)."""
    from benchmarks.quality.methods import BASELINES, ICM_ROWS
    from engine.fusion.registry import get_method, list_methods

    rows = BASELINES + ICM_ROWS
    for row in rows:
        get_method(row.method).parse_params(row.params)
    assert len({row.label for row in rows}) == len(rows)
    assert {m.name for m in list_methods()} <= {row.method for row in rows}


def test_a_changed_suite_configuration_invalidates_only_that_suite(tmp_path):
    from dataclasses import replace

    from benchmarks.lab.build import _check_config

    size = SIZES["tiny"]
    _check_config(tmp_path, size, 0, ("encoder", "generative"))
    (tmp_path / "encoder").mkdir()
    (tmp_path / "generative").mkdir()
    changed = replace(size, encoder=replace(size.encoder, lora_layers=2))
    assert changed.fingerprint("generative") == size.fingerprint("generative")
    _check_config(tmp_path, changed, 0, ("generative",))  # the generative suite's work stays valid
    with pytest.raises(
        ValueError, match=r"encoder suite was built from another encoder configuration"
    ) as err:
        _check_config(tmp_path, changed, 0, ("encoder",))
    assert str(tmp_path / "encoder") in str(err.value)
    with pytest.raises(ValueError, match="seed=0; this build is size='tiny', seed=1"):
        _check_config(tmp_path, size, 1, ("generative",))
    # Once the stale suite's directory is gone, it is rebuilt under the new fingerprint.
    (tmp_path / "encoder").rmdir()
    assert _check_config(tmp_path, changed, 0, ("encoder",))["fingerprints"] == {
        "encoder": changed.fingerprint("encoder"),
        "generative": size.fingerprint("generative"),
    }
