"""In-context task vectors (docs/design.md §2.3): per task, the base model's mean last-layer hidden
state over k examples, optionally with the task's adapter applied; computed on a Ray Data actor
pool and stored in the catalog under ``task_vectors/<task>.json``."""

from engine.task_vectors.compute import compute_task_vectors, plan_task_vectors
from engine.task_vectors.store import load_task_vectors, save_task_vectors, vector_tasks
from engine.task_vectors.vector import TaskVector, example_id, mean_vector, select_examples, spec_hash

__all__ = [
    "TaskVector",
    "compute_task_vectors",
    "example_id",
    "load_task_vectors",
    "mean_vector",
    "plan_task_vectors",
    "save_task_vectors",
    "select_examples",
    "spec_hash",
    "vector_tasks",
]
