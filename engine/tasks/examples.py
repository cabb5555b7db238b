"""Task examples: load from JSON Lines / CSV / Parquet with ``datasets``, validate, split.

Fields ("roles") by model kind; a task definition's ``fields`` maps a role to another column name:

==============  ==========================================================================
kind            fields of one example
==============  ==========================================================================
``causal_lm``   ``prompt`` (str) and ``completion`` (str); loss is taken on the completion
``seq_cls``     ``text`` (str) and ``label`` (int class id in ``[0, num_labels)``)
``custom``      ``input`` (list of numbers; in CSV a string ``"0.1 0.2 ..."``) and ``label``
==============  ==========================================================================

Other columns are ignored. CSV columns are read as strings (so ``"007"`` stays ``"007"``);
labels are then parsed as integers. Splitting is deterministic (see :class:`SplitSpec`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.tasks.errors import ExamplesError
from engine.tasks.spec import CATALOG_RELATIVE, EXAMPLE_FORMATS, SplitSpec, TaskDefinition, infer_format

if TYPE_CHECKING:
    import datasets

    from engine.catalog import Catalog

MAX_FAULTS = 10  # bad rows listed in one error before "... and N more"
SPLIT_ROLE = "split"  # the column of predefined splits (SplitSpec.column), read as text
SPLIT_NAMES = ("train", "support", "eval")


@dataclass
class TaskSplits:
    """A task's examples, split. Each split is a ``datasets.Dataset`` with one column per role.

    Attributes:
        train, support, eval: the splits (pairwise disjoint).
        duplicates: exact duplicates dropped before splitting.
        indices: split name -> ``[k]`` row numbers in the examples file (0-based).
    """

    train: datasets.Dataset
    support: datasets.Dataset
    eval: datasets.Dataset
    duplicates: int = 0
    indices: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- loading
def load_examples(
    source: str,
    columns: Mapping[str, str],
    fmt: str | None = None,
    storage_options: dict[str, Any] | None = None,
    num_labels: int | None = None,
) -> datasets.Dataset:
    """Read an examples file into a ``datasets.Dataset`` with one column per role.

    Args:
        source: local path or fsspec URI of a ``.jsonl``/``.csv``/``.parquet`` file.
        columns: role -> column name in the file (e.g. ``{"prompt": "question", ...}``).
        fmt: ``json``, ``csv`` or ``parquet`` (default: from the suffix).
        storage_options: fsspec options for remote files.
        num_labels: when given, every ``label`` must lie in ``[0, num_labels)``.

    Returns:
        Dataset with columns exactly ``list(columns)``; text roles are ``str``, ``label`` is
        ``int``, ``input`` is a list of floats.

    Raises:
        ExamplesError: naming the file and every fault (missing columns, bad rows).
    """
    fmt = fmt or infer_format(source)
    if fmt not in EXAMPLE_FORMATS:
        raise ExamplesError(source, [f"unknown format; name it one of {list(EXAMPLE_FORMATS)} (--format)"])
    if "://" not in source and not os.path.isfile(source):
        raise ExamplesError(source, ["no such file; give the path of a JSON Lines, CSV or Parquet file"])
    raw = _read(source, fmt, storage_options)
    missing = [f"{role} (column {col!r})" for role, col in columns.items() if col not in raw.column_names]
    if missing:
        raise ExamplesError(
            source,
            [
                f"missing field(s) {', '.join(missing)}; the file has columns {raw.column_names}. "
                "Rename them or map each role to a column with --field ROLE=COLUMN"
            ],
        )
    if raw.num_rows == 0:
        raise ExamplesError(source, ["holds no examples"])
    return _normalize(raw, columns, source, num_labels)


def _read(source: str, fmt: str, storage_options: dict[str, Any] | None) -> datasets.Dataset:
    import datasets

    kwargs: dict[str, Any] = {}
    if fmt == "csv":  # every column as a string: numbers in text fields keep their spelling
        header = _csv_header(source, storage_options)
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        return datasets.load_dataset(
            fmt, data_files=source, split="train", storage_options=storage_options, **kwargs
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ExamplesError(source, [f"cannot be read as {fmt}: {type(exc).__name__}: {exc}"]) from None


def _csv_header(source: str, storage_options: dict[str, Any] | None) -> list[str]:
    import fsspec

    with fsspec.open(source, "rb", compression="infer", **(storage_options or {})) as handle:
        first = io.TextIOWrapper(handle, encoding="utf-8", newline="").readline()
    header = next(csv.reader([first]), [])
    if not header:
        raise ExamplesError(source, ["the CSV file has no header row; the first row must name the columns"])
    return header


def _normalize(
    raw: datasets.Dataset, columns: Mapping[str, str], source: str, num_labels: int | None
) -> datasets.Dataset:
    import datasets
    from datasets.table import InMemoryTable

    data, faults = {}, []
    for role, column in columns.items():
        convert = _CONVERTERS.get(role, _as_text)
        if role == "label" and num_labels is not None:
            convert = _label_in_range(num_labels)
        values, role_faults = _convert_column(raw[column], convert, role, column)
        data[role] = values
        faults += role_faults
    if faults:
        shown = faults[:MAX_FAULTS]
        if len(faults) > MAX_FAULTS:
            shown.append(f"... and {len(faults) - MAX_FAULTS} more")
        raise ExamplesError(source, shown)
    # Our own fingerprint: ``Dataset.from_dict`` would hash the Arrow table with dill, whose
    # global-variable scan swaps ``sys.stdout`` and, racing another thread of a Ray worker, prints
    # a bytecode disassembly into the user's terminal.
    fingerprint = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return datasets.Dataset(InMemoryTable.from_pydict(data), fingerprint=fingerprint)


def _convert_column(values: Sequence[Any], convert: Callable, role: str, column: str):
    out, faults = [], []
    for row, value in enumerate(values):
        try:
            out.append(convert(value))
        except ValueError as exc:
            faults.append(f"row {row}, field {role} (column {column!r}): {exc}")
    return out, faults


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _as_label(value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer class id, got {_show(value)}")
    return value


def _label_in_range(num_labels: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        label = _as_label(value)
        if not 0 <= label < num_labels:
            raise ValueError(f"label {label} is outside [0, {num_labels}) (num_labels of the model spec)")
        return label

    return convert


def _as_input(value: Any) -> list[float]:
    if isinstance(value, str):
        value = value.strip().strip("[]").replace(",", " ").split()
    try:
        floats = [float(v) for v in value] if isinstance(value, (list, tuple)) else None
    except (TypeError, ValueError):
        floats = None
    if not floats:
        raise ValueError(f"expected a non-empty list of numbers, got {_show(value)}")
    return floats


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_CONVERTERS: dict[str, Callable[[Any], Any]] = {"label": _as_label, "input": _as_input}


# ---------------------------------------------------------------------------------- splitting
def first_occurrences(keys: Sequence[Any]) -> np.ndarray:
    """Indices of the first occurrence of each distinct key, in order, ``[k]`` int64."""
    seen: set = set()
    keep = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def split_indices(
    n: int, n_eval: int, n_support: int, n_train: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one seeded permutation of ``range(n)`` into eval, then support, then train.

    Returns:
        ``(train, support, eval)`` index arrays, pairwise disjoint; eval depends only on
        ``(n, n_eval, seed)``.
    """
    if n_eval + n_support + n_train > n:
        raise ValueError(f"split sizes {n_eval}+{n_support}+{n_train} exceed {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = order[:n_eval]
    support_idx = order[n_eval : n_eval + n_support]
    train_idx = order[n_eval + n_support : n_eval + n_support + n_train]
    return train_idx, support_idx, eval_idx


def split_examples(examples: datasets.Dataset, split: SplitSpec, source: str = "<examples>") -> TaskSplits:
    """Deduplicate (when ``split.dedupe``) and split ``examples`` deterministically.

    Raises:
        ExamplesError: if the examples cannot hold the requested sizes.
    """
    if split.dedupe:
        rows = zip(*(examples[c] for c in examples.column_names), strict=True)
        kept = first_occurrences([tuple(_hashable(v) for v in row) for row in rows])
    else:
        kept = np.arange(examples.num_rows)
    try:
        n_eval, n_support, n_train = split.sizes(len(kept))
    except ValueError as exc:
        raise ExamplesError(source, [str(exc)]) from None
    train, support, held_out = (
        kept[i] for i in split_indices(len(kept), n_eval, n_support, n_train, split.seed)
    )
    return TaskSplits(
        train=examples.select(train),
        support=examples.select(support),
        eval=examples.select(held_out),
        duplicates=examples.num_rows - len(kept),
        indices={"train": train, "support": support, "eval": held_out},
    )


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------- task level
def examples_uri(definition: TaskDefinition, catalog: Catalog | None = None) -> str:
    """Where a task's examples are: a URI or absolute path as stored, or, for ``catalog:PATH``
    (and, from definitions written before that form, a bare relative path), ``PATH`` under the
    catalog root."""
    source = definition.examples
    if source.startswith(CATALOG_RELATIVE):
        source = source[len(CATALOG_RELATIVE) :].lstrip("/")
    elif "://" in source or os.path.isabs(source):
        return source
    if catalog is None:
        return source
    if "://" in catalog.uri:
        return f"{catalog.uri.rstrip('/')}/{source}"
    return os.path.join(catalog.root, source)


def load_task_examples(definition: TaskDefinition, catalog: Catalog | None = None) -> TaskSplits:
    """Load and split the examples of a task definition."""
    source = examples_uri(definition, catalog)
    columns = dict(definition.columns)
    if definition.split.column is not None:
        columns[SPLIT_ROLE] = definition.split.column
    examples = load_examples(source, columns, definition.data_format, num_labels=definition.model.num_labels)
    if definition.split.column is not None:
        return predefined_splits(examples, source)
    return split_examples(examples, definition.split, source)


def predefined_splits(examples: datasets.Dataset, source: str = "<examples>") -> TaskSplits:
    """Split by the examples' own ``split`` column (``train`` / ``support`` / ``eval``), which is
    then dropped.

    Raises:
        ExamplesError: naming the rows whose split is not one of the three, or an empty eval split.
    """
    names = examples[SPLIT_ROLE]
    faults = [
        f"row {i}: split {value!r} is not one of {list(SPLIT_NAMES)}"
        for i, value in enumerate(names)
        if value not in SPLIT_NAMES
    ]
    if not faults and "eval" not in names:
        faults.append("no example has split 'eval'; evaluation needs held-out examples")
    if faults:
        raise ExamplesError(source, faults[:MAX_FAULTS])
    examples = examples.remove_columns(SPLIT_ROLE)
    indices = {
        name: np.array([i for i, value in enumerate(names) if value == name], dtype=np.int64)
        for name in SPLIT_NAMES
    }
    return TaskSplits(
        train=examples.select(indices["train"]),
        support=examples.select(indices["support"]),
        eval=examples.select(indices["eval"]),
        indices=indices,
    )
