"""Task models (the model a LoRA adapts), task examples and definitions, and fusion evaluation.

- :mod:`~engine.tasks.spec`: pydantic specs of models and task definitions (JSON/YAML).
- :mod:`~engine.tasks.base`: the :class:`TaskModel` protocol and registry; kinds in
  :mod:`~engine.tasks.models` (``causal_lm``, ``seq_cls``, ``custom``).
- :mod:`~engine.tasks.apply`: apply a PEFT adapter directory or a catalog adapter, unmerged.
- :mod:`~engine.tasks.examples`: load JSON Lines / CSV / Parquet examples and split them.
- :mod:`~engine.tasks.store`: task definitions under ``<catalog>/tasks/<name>.json``.
- :mod:`~engine.tasks.evaluate`: gap closure of a fused adapter (docs/design.md §4).
- :mod:`~engine.tasks.metrics`: the pure math behind all of it.
"""

from engine.tasks.apply import adapted, apply_adapter, apply_catalog_adapter
from engine.tasks.base import BaseTaskModel, TaskModel, register_task_model, task_model
from engine.tasks.errors import ExamplesError, SpecError, TaskError
from engine.tasks.evaluate import (
    PROVENANCE_FILE,
    FusionEval,
    OwnAdapter,
    Provenance,
    TaskEval,
    evaluate_fusion,
    read_provenance,
    resolve_own,
)
from engine.tasks.examples import TaskSplits, load_examples, load_task_examples, split_examples
from engine.tasks.metrics import gap_closure
from engine.tasks.spec import ROLES, ModelSpec, SplitSpec, TaskDefinition, TokenizerSpec, load_model_spec
from engine.tasks.store import list_tasks, load_task, save_task, task_names

__all__ = [
    "PROVENANCE_FILE",
    "ROLES",
    "BaseTaskModel",
    "ExamplesError",
    "FusionEval",
    "ModelSpec",
    "OwnAdapter",
    "Provenance",
    "SpecError",
    "SplitSpec",
    "TaskDefinition",
    "TaskError",
    "TaskEval",
    "TaskModel",
    "TaskSplits",
    "TokenizerSpec",
    "adapted",
    "apply_adapter",
    "apply_catalog_adapter",
    "evaluate_fusion",
    "gap_closure",
    "list_tasks",
    "load_examples",
    "load_model_spec",
    "load_task",
    "load_task_examples",
    "read_provenance",
    "register_task_model",
    "resolve_own",
    "save_task",
    "split_examples",
    "task_model",
    "task_names",
]
