"""Meta-training tests reuse the task tests' lab catalog (tiny Llama, tasks with examples)."""

from tests.tasks.conftest import bert_spec, lab_catalog, lab_spec  # noqa: F401  (fixtures)
