"""Pure parts: averaging, example selection and ids, records, dimension checks (milliseconds)."""

from __future__ import annotations

import pytest
import torch

from engine.task_vectors import TaskVector, example_id, mean_vector, select_examples, spec_hash
from engine.task_vectors.vector import check_dims
from engine.tasks.errors import TaskError


def vec(task="t", d=4, model="m", **kw) -> TaskVector:
    return TaskVector(task=task, vector=torch.arange(d, dtype=torch.float32) / 3, k=2,
                      example_ids=["a", "b"], model=model, with_adapter=True, adapters=["t-1"], **kw)  # fmt: skip


def test_mean_vector_is_the_row_mean_in_float32():
    hidden = torch.randn(5, 3, dtype=torch.float64)
    out = mean_vector(hidden)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, hidden.mean(0).float())
    # batching-independent: mean of equal-size chunk means is the same
    torch.testing.assert_close(mean_vector(torch.stack([mean_vector(hidden[:5]), out])), out)


@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3), torch.tensor([[1.0, float("nan")]])])
def test_mean_vector_rejects_empty_flat_and_non_finite(bad):
    with pytest.raises(ValueError):
        mean_vector(bad)


def test_select_examples_is_seeded_and_says_how_many():
    rows = [{"prompt": str(i), "completion": "x"} for i in range(10)]
    first = select_examples(rows, 4, seed=1)
    assert first == select_examples(rows, 4, seed=1) and first != select_examples(rows, 4, seed=2)
    assert len({r["prompt"] for r in first}) == 4
    with pytest.raises(TaskError, match=r"hold 10 example.*fewer than k=11"):
        select_examples(rows, 11, seed=0, what="task 'x'")
    with pytest.raises(TaskError, match="k must be >= 1"):
        select_examples(rows, 0, seed=0)


def test_example_id_is_content_hash_independent_of_key_order():
    assert example_id({"a": 1, "b": "x"}) == example_id({"b": "x", "a": 1})
    assert example_id({"a": 1, "b": "x"}) != example_id({"a": 1, "b": "y"})
    assert len(example_id({"a": 1})) == 16


def test_spec_hash_of_dict_and_model_agree():
    from engine.demo.tasks import demo_model_spec

    spec = demo_model_spec()
    assert spec_hash(spec) == spec_hash(spec.model_dump(mode="json")) != spec_hash(demo_model_spec(seed=1))


def test_record_round_trip_is_exact():
    v = vec()
    v.vector = torch.randn(7)
    back = TaskVector.from_record(v.to_record())
    assert torch.equal(back.vector, v.vector) and back.dim == 7
    assert back.to_record() == v.to_record()


def test_record_faults_name_the_file():
    record = vec().to_record()
    with pytest.raises(TaskError, match=r"f\.json: dim is 9"):
        TaskVector.from_record({**record, "dim": 9}, "f.json")
    del record["model"]
    with pytest.raises(TaskError, match=r"missing field\(s\) \['model'\]"):
        TaskVector.from_record(record, "f.json")


def test_check_dims_per_model():
    check_dims({"a": vec("a", 4), "b": vec("b", 8, model="other")})
    with pytest.raises(TaskError, match=r"disagree in dimension \(d=4: \['a'\]; d=8: \['b'\]\)"):
        check_dims({"a": vec("a", 4), "b": vec("b", 8)})
