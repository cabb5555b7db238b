"""Task models: completion-only loss, metrics, hidden states, adapters applied unmerged."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from engine.demo import tiny
from engine.demo.tasks import demo_examples
from engine.tasks import TaskError, TaskModel, adapted, apply_adapter, task_model
from engine.tasks.models.custom import last_linear_name
from tests.helpers import bert_spec_dict, custom_spec_dict, save_lora, sentiment_rows


@pytest.fixture(scope="module")
def demo(demo_spec):
    model = task_model(demo_spec)
    return model, model.build_base()


def test_kinds_follow_the_protocol(demo_spec, bert_spec, custom_spec):
    for spec in (demo_spec, bert_spec, custom_spec):
        assert isinstance(task_model(spec), TaskModel)


def test_base_is_frozen_deterministic_and_leaves_the_rng_alone(demo_spec, demo):
    model, base = demo
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    state = torch.random.get_rng_state()
    again = model.build_base()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters(), strict=True))


# ---------------------------------------------------------------------------------- causal LM
def test_demo_tokens_and_loss_match_the_demo(demo):
    """Same tokens as engine.demo.tiny, and the loss equals transformers' masked-label loss."""
    model, base = demo
    examples = demo_examples("reverse", 16, seed=7)
    input_ids, labels = tiny.task_batch("reverse", 16, torch.Generator().manual_seed(7))
    batch = model.encode(examples)
    assert torch.equal(batch["input_ids"], input_ids) and torch.equal(batch["labels"], labels)
    expected = float(base(input_ids=input_ids, labels=labels).loss)
    assert float(model.loss(base, examples)) == pytest.approx(expected, rel=1e-5)
    all_tokens = float(base(input_ids=input_ids, labels=input_ids).loss)
    assert abs(all_tokens - expected) > 1e-3  # the mask matters on this data


def test_prompt_tokens_contribute_nothing_to_the_loss(demo):
    """The gradient of the loss w.r.t. logits is zero at every position predicting a prompt token."""
    model, base = demo
    examples = [
        {"prompt": "<copy> 1 2 3 <sep>", "completion": "1 2 3"},
        {"prompt": "<sort> 9 8 7 6 5 4 <sep>", "completion": "4"},  # longer prompt, padding in row 0
    ]
    captured = {}

    def keep_logits(_module, _inputs, output):
        output = output.detach().requires_grad_(True)
        captured["logits"] = output
        return output

    handle = base.lm_head.register_forward_hook(keep_logits)
    try:
        model.loss(base, examples).backward()
    finally:
        handle.remove()
    grad = captured["logits"].grad.abs().sum(dim=-1)  # [n, T]; position p predicts token p + 1
    batch = model.encode(examples)
    for row, (prompt_len, length) in enumerate(
        zip(batch["prompt_len"], batch["attention_mask"].sum(1), strict=True)
    ):
        scored = set(range(int(prompt_len) - 1, int(length) - 1))  # positions predicting completion tokens
        for position in range(grad.shape[1]):
            assert (grad[row, position] > 0) == (position in scored), (row, position)


def test_truncation_keeps_the_completion_and_the_prompt_tail(demo_spec):
    model = task_model(demo_spec.model_copy(update={"max_length": 6}))
    batch = model.encode([{"prompt": "<copy> 1 2 3 4 5 6 <sep>", "completion": "1 2 3 4"}])
    assert batch["input_ids"][0].tolist() == [16, 2, 11, 12, 13, 14]  # "6 <sep> 1 2 3 4"
    batch = model.encode([{"prompt": "<copy> 1 <sep>", "completion": "1 2 3 4 5 6 7 8"}])
    assert batch["input_ids"][0].tolist() == [2, 11, 12, 13, 14, 15]  # one prompt token survives
    with pytest.raises(TaskError, match="completion has no tokens"):
        model.encode([{"prompt": "<copy>", "completion": ""}])


def test_lm_metrics(demo):
    model, base = demo
    examples = demo_examples("copy", 10, seed=3)
    metrics = model.metrics(base, examples, batch_size=3)  # uneven batches
    assert metrics["loss"] == pytest.approx(float(model.loss(base, examples)), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    assert metrics["tokens"] == 60 and metrics["examples"] == 10 and metrics["exact_match"] == 0.0


def test_example_sums_resample_to_the_metrics_of_the_resampled_examples(demo, bert):
    """``finalize`` of per-example sums weighted by multiplicities equals ``metrics`` on that multiset
    (what the paired bootstrap over eval examples relies on), for a causal LM and a classifier."""
    lm, lm_base = demo
    clf, clf_base, _ = bert
    for model, base, rows in (
        (lm, lm_base, demo_examples("sort", 7, seed=4)),
        (clf, clf_base, sentiment_rows(7)),
    ):
        sums = model.example_sums(base, rows, batch_size=3)
        assert all(v.shape == (7,) and v.dtype == torch.float64 for v in sums.values())
        whole = model.finalize({k: float(v.sum()) for k, v in sums.items()})
        assert whole == pytest.approx(model.metrics(base, rows, batch_size=4), rel=1e-9)
        draw = [0, 0, 3, 6, 6, 6, 2]
        counts = torch.bincount(torch.tensor(draw), minlength=7).double()
        resampled = model.finalize({k: float(counts @ v) for k, v in sums.items()})
        assert resampled == pytest.approx(model.metrics(base, [rows[i] for i in draw]), rel=1e-5)


def test_exact_match_is_greedy_reproduction(demo):
    model, base = demo
    example = demo_examples("copy", 1, seed=5)[0]
    batch = model.encode([example])
    with torch.no_grad():
        greedy = base(input_ids=batch["input_ids"]).logits.argmax(-1)[0]
    prompt_len = int(batch["prompt_len"][0])
    predicted = greedy[prompt_len - 1 : -1].tolist()  # what greedy decoding emits, given the true prefix
    words = [tiny_word(i) for i in predicted]
    assert model.metrics(base, [example])["exact_match"] == 0.0
    assert model.metrics(base, [dict(example, completion=" ".join(words[:1]))])["exact_match"] == 1.0


def tiny_word(token_id: int) -> str:
    from engine.demo.tasks import DEMO_VOCAB

    return DEMO_VOCAB[token_id]


def test_lm_hidden_states_at_the_last_prompt_token(demo):
    model, base = demo
    examples = [
        {"prompt": "<copy> 1 2 <sep>", "completion": "1 2"},
        {"prompt": "<reverse> 1 2 3 4 5 <sep>", "completion": "5"},
    ]
    hidden = model.hidden_states(base, examples)
    assert hidden.shape == (2, 64) and hidden.dtype == torch.float32
    for i, example in enumerate(examples):
        alone = model.hidden_states(base, [example])[0]
        torch.testing.assert_close(hidden[i], alone, atol=1e-5, rtol=1e-5)  # padding-invariant
        ids = model.encode([example])
        prompt_len = int(ids["prompt_len"][0])
        with torch.no_grad():
            logits = base(input_ids=ids["input_ids"]).logits[0, prompt_len - 1]
            torch.testing.assert_close(
                base.lm_head(alone), logits, atol=1e-4, rtol=1e-4
            )  # what the head reads


# ---------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def bert(bert_spec, tmp_path_factory):
    model = task_model(bert_spec)
    base = model.build_base()
    path = save_lora(
        base,
        tmp_path_factory.mktemp("bert") / "adapter",
        seed=1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return model, base, path


def test_classification_metrics_and_hidden_states(bert):
    model, base, _ = bert
    rows = sentiment_rows(12)
    metrics = model.metrics(base, rows, batch_size=5)
    assert set(metrics) == {"loss", "accuracy", "examples"} and 0 <= metrics["accuracy"] <= 1
    assert metrics["loss"] == pytest.approx(float(model.loss(base, rows)), rel=1e-5)
    rows = [{"text": "good", "label": 0}, {"text": "very very bad film not", "label": 1}]
    hidden = model.hidden_states(base, rows)
    assert hidden.shape == (2, 32)
    torch.testing.assert_close(hidden[0], model.hidden_states(base, rows[:1])[0], atol=1e-5, rtol=1e-5)
    cls = task_model(model.spec.model_copy(update={"pooling": "cls"}))
    assert not torch.allclose(cls.hidden_states(base, rows), hidden)


def test_classification_adapter_head_applied_and_removed(bert):
    model, base, path = bert
    rows = sentiment_rows(8, seed=2)
    batch = model.encode(rows)
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with adapted(base, path) as peft_model:
        assert isinstance(peft_model, PeftModel)
        with torch.no_grad():
            during = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Same numbers as stock PEFT on a fresh base.
        reference = PeftModel.from_pretrained(model.build_base(), str(path))
        with torch.no_grad():
            expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(during, expected)
        head = peft_model.base_model.model.classifier.modules_to_save["default"].weight
        reference_head = reference.base_model.model.classifier.modules_to_save["default"].weight
        assert torch.equal(head, reference_head)
    assert not torch.allclose(before, during)
    with torch.no_grad():
        after = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # unmerged: the base is pristine again


def test_label_out_of_range(bert):
    model, _, _ = bert
    with pytest.raises(TaskError, match=r"example 1: label 3 is outside \[0, 3\)"):
        model.encode([{"text": "good", "label": 0}, {"text": "bad", "label": 3}])


# ---------------------------------------------------------------------------------- custom module
def test_custom_module_metrics_and_hidden_states(custom_spec, tmp_path):
    model = task_model(custom_spec)
    base = model.build_base()
    rows = [{"input": [0.1 * i, -0.2, 0.3, float(i)], "label": i % 3} for i in range(6)]
    x = torch.tensor([r["input"] for r in rows])
    hidden = model.hidden_states(base, rows)
    torch.testing.assert_close(hidden, base.features(x))  # the input of the last Linear (the head)
    metrics = model.metrics(base, rows)
    expected = torch.nn.functional.cross_entropy(base(x), torch.tensor([r["label"] for r in rows]))
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    path = save_lora(base, tmp_path / "mlp", target_modules=["fc1", "fc2"], modules_to_save=["head"])
    peft_model = apply_adapter(base, path)
    assert last_linear_name(peft_model) == "head"
    adapted_hidden = model.hidden_states(peft_model, rows)
    assert adapted_hidden.shape == (6, 8) and not torch.allclose(adapted_hidden, hidden)
    torch.testing.assert_close(adapted_hidden, peft_model.base_model.model.features(x))


def test_custom_factory_errors(custom_spec):
    bad = custom_spec.model_copy(update={"factory": "tests.tasks.custom_models:nope"})
    with pytest.raises(TaskError, match="has no attribute 'nope'"):
        task_model(bad).build_base()
    bad = custom_spec.model_copy(update={"factory": "no_such_module_xyz:f"})
    with pytest.raises(TaskError, match="cannot import module 'no_such_module_xyz'"):
        task_model(bad).build_base()


# ---------------------------------------------------------------------------------- adapters and tokenizers
def test_adapter_for_another_base_is_refused(demo, tmp_path):
    _, base = demo
    path = save_lora(task_model(custom_spec_dict()).build_base(), tmp_path / "mlp", target_modules=["fc1"])
    with pytest.raises(TaskError, match="cannot be applied to this base model"):
        apply_adapter(base, path)
    assert not isinstance(base, PeftModel) and not hasattr(base, "peft_config")


def test_pickle_only_adapter_is_refused(demo, tmp_path):
    _, base = demo
    path = save_lora(base, tmp_path / "a", target_modules=["q_proj"])
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"only adapter_model\.bin found"):
        apply_adapter(base, path)


def test_hf_tokenizer_from_a_local_directory(tmp_path, demo_spec):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from engine.demo.tasks import DEMO_VOCAB

    vocab = {w: i for i, w in enumerate(DEMO_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", pad_token="<pad>")
    fast.save_pretrained(tmp_path / "tok")
    spec = type(demo_spec).model_validate(
        dict(demo_spec.model_dump(), tokenizer={"kind": "hf", "path": str(tmp_path / "tok")})
    )
    model = task_model(spec)
    batch = model.encode([{"prompt": "<copy> 1 2 <sep>", "completion": "1 2"}])
    assert batch["input_ids"][0].tolist() == [1, 3, 11, 12, 2, 11, 12]  # BOS added: the tokenizer's default
    assert batch["labels"][0].tolist() == [-100] * 5 + [11, 12]
    bad = type(demo_spec).model_validate(
        dict(spec.model_dump(), tokenizer={"kind": "hf", "path": str(tmp_path)})
    )
    with pytest.raises(TaskError, match="cannot load a transformers tokenizer"):
        task_model(bad).encode([{"prompt": "a", "completion": "b"}])


def test_builtin_char_tokenizer_and_vocab_check():
    spec = dict(bert_spec_dict(), tokenizer={"kind": "char"})  # 101 default chars > 64 embeddings
    model = task_model(spec)
    assert model.text.prompt("ab") == [1, 69, 70]  # <bos> then the characters
    with pytest.raises(TaskError, match="tokenizer has 101 tokens but the model embeds only 64"):
        model.build_base()
    with pytest.raises(TaskError, match="unknown character"):
        task_model(dict(spec, tokenizer={"kind": "char", "vocab": ["a"]})).text.prompt("ab")
