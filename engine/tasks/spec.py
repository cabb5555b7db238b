"""User-facing specs of task models and task definitions, validated by pydantic.

A **model spec** says which model a LoRA adapts and how examples become tensors; a **task
definition** adds the examples file, the field names and the split. Both are stored as JSON (task
definitions under ``<catalog>/tasks/<name>.json``) and read from JSON or YAML files.

Validation reports every fault at once: pydantic's field errors (types, unknown keys, ranges) and
the cross-field rules below, each as ``field: problem (fix)``.

Example model spec (YAML)::

    kind: causal_lm               # causal_lm | seq_cls | custom
    config: {model_type: llama, vocab_size: 128, hidden_size: 64, num_hidden_layers: 2,
             num_attention_heads: 4, intermediate_size: 128}   # or path: /models/my-llama
    tokenizer: {kind: char}       # char | whitespace | hf (with path:)
    max_length: 64
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from engine.catalog.schema import NAME_RE
from engine.errors import pydantic_faults
from engine.paths import absolute_location, folder_of
from engine.tasks.errors import SpecError

ModelKind = Literal["causal_lm", "seq_cls", "custom"]

# Example fields each kind reads (the "roles"); a task definition's ``fields`` maps them to columns.
ROLES: dict[str, tuple[str, ...]] = {
    "causal_lm": ("prompt", "completion"),
    "seq_cls": ("text", "label"),
    "custom": ("input", "label"),
}
EXAMPLE_FORMATS = ("json", "csv", "parquet")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CROSS = "cross_field"  # pydantic error type of the cross-field rules (recomputed on raw input)
# Special tokens of the built-in ``char`` tokenizer's default vocab (ids 0-3).
DEFAULT_CHAR_SPECIALS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _cross_field(self):
        faults = self.cross_faults(self.model_dump())
        if faults:
            raise PydanticCustomError(_CROSS, "\n".join(faults))
        return self

    @classmethod
    def cross_faults(cls, data: dict[str, Any]) -> list[str]:
        """Faults between fields of ``data`` (raw input: values of the wrong type are skipped)."""
        return []


class TokenizerSpec(_Strict):
    """How text becomes token ids.

    Attributes:
        kind: ``char`` (one token per character), ``whitespace`` (one token per
            whitespace-separated word), or ``hf`` (a transformers tokenizer saved in ``path``).
        path: local directory of a transformers tokenizer (``hf``; never downloaded), or a
            character tokenizer file (``char``; :mod:`engine.tasks.chartok`) instead of ``vocab``.
        vocab: token strings in id order (``char``/``whitespace``). ``char`` defaults to
            ``<pad> <bos> <eos> <unk>`` then printable ASCII; ``whitespace`` needs one.
        pad_token, bos_token, eos_token, unk_token: special tokens, entries of ``vocab``
            (built-in kinds; an ``hf`` tokenizer brings its own). Without ``pad_token`` batches
            are padded with id 0 (padding is masked either way). Without ``unk_token`` an unknown
            character or word is an error.
        add_bos: prepend BOS to every prompt/text (default: when the tokenizer has one and, for
            ``hf``, adds it by default).
        add_eos: append EOS to every completion/text (causal LMs then learn to stop).
    """

    kind: Literal["char", "whitespace", "hf"]
    path: str | None = None
    vocab: list[str] | None = None
    pad_token: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    add_bos: bool | None = None
    add_eos: bool = False

    @classmethod
    def cross_faults(cls, data: dict[str, Any]) -> list[str]:
        kind, vocab = data.get("kind"), data.get("vocab")
        specials = {k: data.get(k) for k in ("pad_token", "bos_token", "eos_token", "unk_token")}
        faults = []
        if kind == "hf" or (kind == "char" and data.get("path") is not None):
            # the tokenizer (a transformers directory, a character tokenizer file) has its own vocab
            source = "kind 'hf'" if kind == "hf" else "a tokenizer file (path)"
            if kind == "hf" and not data.get("path"):
                faults.append("path: required for kind 'hf' (a local directory with tokenizer files)")
            if vocab is not None:
                faults.append(f"vocab: not used by {source}; remove it (the tokenizer has its own)")
            faults += [
                f"{k}: not used by {source}; the tokenizer brings its own special tokens"
                for k, v in specials.items()
                if v is not None
            ]
        elif kind in ("char", "whitespace"):
            if data.get("path") is not None:
                faults.append(f"path: not used by kind {kind!r}; remove it or use kind 'hf'")
            faults += _vocab_faults(kind, vocab, specials)
            if vocab is not None or kind == "whitespace":
                for flag, token in (("add_bos", "bos_token"), ("add_eos", "eos_token")):
                    if data.get(flag) is True and specials[token] is None:
                        faults.append(f"{flag}: is true but {token} is not set; set {token}")
        return faults


def _vocab_faults(kind: str, vocab: Any, specials: dict[str, Any]) -> list[str]:
    if vocab is None:
        if kind == "whitespace":
            return ["vocab: required for kind 'whitespace' (the list of words, in id order)"]
        return [
            f"{k}: {v!r} is not in the default char vocab; give a vocab or leave {k} unset"
            for k, v in specials.items()
            if isinstance(v, str) and v not in DEFAULT_CHAR_SPECIALS.values()
        ]
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        return []  # pydantic reports the type
    faults = []
    if not vocab:
        faults.append("vocab: is empty; list the tokens in id order")
    duplicates = sorted({t for t in vocab if vocab.count(t) > 1})
    if duplicates:
        faults.append(f"vocab: duplicate entries {duplicates}; every token must appear once")
    special_values = {v for v in specials.values() if isinstance(v, str)}
    for k, v in specials.items():
        if isinstance(v, str) and v not in vocab:
            faults.append(f"{k}: {v!r} is not an entry of vocab; add it to vocab")
    if kind == "char":
        long = [t for t in vocab if len(t) != 1 and t not in special_values]
        if long:
            faults.append(
                f"vocab: entries {long[:5]} are not single characters (kind 'char'); "
                "only special tokens may be longer"
            )
    else:
        spaced = [t for t in vocab if not t or any(c.isspace() for c in t)]
        if spaced:
            faults.append(f"vocab: entries {spaced[:5]} are empty or hold whitespace (kind 'whitespace')")
    return faults


class ModelSpec(_Strict):
    """The model a LoRA adapts, and how examples become tensors.

    Attributes:
        kind: ``causal_lm`` (transformers causal LM; examples ``prompt``/``completion``, loss on
            completion tokens only), ``seq_cls`` (transformers encoder classifier; ``text``/
            ``label``; the task's head comes from the adapter's ``modules_to_save``), or
            ``custom`` (a ``torch.nn.Module`` classifier from ``factory``; ``input``/``label``).
        path: local directory of a transformers model (``save_pretrained``); never downloaded.
        config: a transformers config as a dict with ``model_type``, to build a fresh model
            (initialised with ``seed``) instead of loading ``path``.
        factory: ``package.module:callable`` returning the ``nn.Module`` (``custom`` only).
        factory_kwargs: keyword arguments of ``factory``.
        tokenizer: how text becomes ids (``causal_lm`` and ``seq_cls``).
        max_length: tokens per example after truncation (causal LM: prompt cut from the left,
            then the completion from the right).
        num_labels: number of classes (``seq_cls`` required; ``custom`` optional check).
        pooling: ``seq_cls`` hidden state per example: ``mean`` over non-pad tokens or ``cls``
            (the first token).
        hidden_module: ``custom``: the submodule whose *input* is the hidden state (default:
            the last ``nn.Linear``).
        seed: initialisation seed for everything built fresh (config models, new heads).
        dtype: parameter dtype of the base model.
    """

    kind: ModelKind
    path: str | None = None
    config: dict[str, Any] | None = None
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None
    max_length: int = Field(512, ge=2)
    num_labels: int | None = Field(None, ge=2)
    pooling: Literal["mean", "cls"] = "mean"
    hidden_module: str | None = None
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[self.kind]

    @classmethod
    def cross_faults(cls, data: dict[str, Any]) -> list[str]:
        kind = data.get("kind")
        if kind == "custom":
            return _custom_faults(data)
        if kind not in ("causal_lm", "seq_cls"):
            return []
        faults = []
        path, config = data.get("path"), data.get("config")
        if (path is None) == (config is None):
            faults.append(
                "path/config: set exactly one: 'path' (a local model directory) or 'config' "
                "(a transformers config dict with model_type)"
            )
        if isinstance(config, dict) and not isinstance(config.get("model_type"), str):
            faults.append("config.model_type: required (e.g. 'llama', 'bert') to build a model from config")
        if data.get("tokenizer") is None:
            faults.append(
                f"tokenizer: required for kind {kind!r} (e.g. {{kind: char}} or {{kind: hf, path: DIR}})"
            )
        num_labels = data.get("num_labels")
        if kind == "seq_cls" and num_labels is None:
            faults.append("num_labels: required for kind 'seq_cls' (the number of classes)")
        if (
            kind == "seq_cls"
            and isinstance(config, dict)
            and config.get("num_labels", num_labels) != num_labels
        ):
            faults.append("config.num_labels: differs from num_labels; remove it from config")
        faults += [
            f"{k}: not used by kind {kind!r}; remove it"
            for k in ("factory", "hidden_module")
            if data.get(k) is not None
        ]
        if data.get("factory_kwargs"):
            faults.append(f"factory_kwargs: not used by kind {kind!r}; remove it")
        return faults


def _custom_faults(data: dict[str, Any]) -> list[str]:
    faults = []
    factory = data.get("factory")
    if factory is None:
        faults.append(
            "factory: required for kind 'custom' ('package.module:callable' returning an nn.Module)"
        )
    elif isinstance(factory, str) and not _FACTORY_RE.match(factory):
        faults.append(f"factory: {factory!r} is not 'package.module:callable'")
    faults += [
        f"{k}: not used by kind 'custom'; remove it (the factory builds the model)"
        for k in ("path", "config", "tokenizer")
        if data.get(k) is not None
    ]
    return faults


class SplitSpec(_Strict):
    """Deterministic split of a task's examples into held-out eval, few-shot support and train.

    One permutation of the (deduplicated) examples, seeded by ``seed``, is cut in this order:
    eval first, then support, then train. So the eval split depends only on the examples,
    ``seed`` and ``eval`` — changing the support or train sizes never moves an example into or
    out of eval — and the three splits never share an example.

    Attributes:
        seed: permutation seed.
        eval: held-out examples: a count (int >= 1) or a fraction of the examples (0 < f < 1).
        support: few-shot support examples (k).
        train: training examples (default: all the rest).
        dedupe: drop exact duplicates (same values in every used field) before splitting, so a
            repeated example can never be in eval and in support/train at once.
        column: predefined splits: the examples file's column that names each example's split
            (``train``, ``support`` or ``eval``); the other fields are then ignored.
    """

    seed: int = 0
    eval: int | float = 0.2
    support: int = Field(16, ge=0)
    train: int | None = Field(None, ge=0)
    dedupe: bool = True
    column: str | None = Field(None, min_length=1)

    @classmethod
    def cross_faults(cls, data: dict[str, Any]) -> list[str]:
        value = data.get("eval")
        if isinstance(value, bool):
            return ["eval: must be a count (int >= 1) or a fraction (0 < eval < 1), not a boolean"]
        if isinstance(value, int) and value < 1:
            return [f"eval: count {value} must be >= 1"]
        if isinstance(value, float) and not 0 < value < 1:
            return [f"eval: fraction {value} must be strictly between 0 and 1 (or give a count)"]
        return []

    def sizes(self, n: int) -> tuple[int, int, int]:
        """``(eval, support, train)`` counts for ``n`` examples; raise ``ValueError`` if they do not fit."""
        n_eval = max(1, round(self.eval * n)) if isinstance(self.eval, float) else int(self.eval)
        rest = n - n_eval - self.support
        if rest < 0:
            raise ValueError(
                f"{n} example(s) cannot hold eval={n_eval} + support={self.support}; "
                "lower split.eval / split.support or add examples"
            )
        if self.train is not None and self.train > rest:
            raise ValueError(
                f"split.train={self.train} but only {rest} example(s) remain after eval={n_eval} "
                f"and support={self.support}; lower split.train or leave it unset (= all the rest)"
            )
        return n_eval, self.support, rest if self.train is None else self.train


CATALOG_RELATIVE = "catalog:"


def stored_location(location: str) -> str:
    """``location`` as a task definition stores it: ``catalog:PATH`` unchanged, anything else as
    :func:`engine.paths.absolute_location` (a relative path against the current directory, where
    the user wrote it)."""
    return location if location.startswith(CATALOG_RELATIVE) else absolute_location(location)


class TaskDefinition(_Strict):
    """A task as stored in a catalog (``tasks/<name>.json``).

    Attributes:
        format: schema version of this file.
        name: task name (the ``task`` of its catalog adapters); ``[A-Za-z0-9._-]``.
        model: the model spec.
        examples: the examples file: a URI, an absolute path, or ``catalog:PATH`` for a file under
            the catalog root. A relative path is relative to the current directory and is made
            absolute when the definition is stored (:func:`absolute_locations`).
        examples_format: ``json`` (JSON Lines), ``csv`` or ``parquet``; default from the suffix.
        fields: role -> column name where they differ (roles: ``prompt``/``completion``,
            ``text``/``label`` or ``input``/``label`` by model kind).
        split: how examples are split.
        description: free text.
        created: ISO timestamp of the definition.
    """

    format: Literal[1] = 1
    name: str
    model: ModelSpec
    examples: str = Field(min_length=1)
    examples_format: Literal["json", "csv", "parquet"] | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    split: SplitSpec = Field(default_factory=SplitSpec)
    description: str = ""
    created: str | None = None

    @classmethod
    def cross_faults(cls, data: dict[str, Any]) -> list[str]:
        faults = []
        name = data.get("name")
        if isinstance(name, str) and not NAME_RE.match(name):
            faults.append(
                f"name: {name!r} is invalid; use 1-128 characters from A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        model, fields = data.get("model"), data.get("fields")
        kind = model.get("kind") if isinstance(model, dict) else None
        if kind in ROLES and isinstance(fields, dict):
            unknown = sorted(set(fields) - set(ROLES[kind]))
            if unknown:
                faults.append(
                    f"fields: unknown role(s) {unknown} for kind {kind!r}; roles are {list(ROLES[kind])}"
                )
        examples, fmt = data.get("examples"), data.get("examples_format")
        if isinstance(examples, str) and examples and fmt is None and infer_format(examples) is None:
            faults.append(
                f"examples_format: cannot tell the format of {examples!r} from its suffix; "
                f"set it to one of {list(EXAMPLE_FORMATS)}"
            )
        return faults

    def absolute_locations(self) -> TaskDefinition:
        """A copy whose examples file, model directory and tokenizer directory are URIs, absolute
        paths or ``catalog:PATH``, so the stored definition means the same from any directory, on
        any Ray worker."""
        model = self.model
        if model.path is not None:
            model = model.model_copy(update={"path": stored_location(model.path)})
        if model.tokenizer is not None and model.tokenizer.path is not None:
            tokenizer = model.tokenizer.model_copy(update={"path": stored_location(model.tokenizer.path)})
            model = model.model_copy(update={"tokenizer": tokenizer})
        return self.model_copy(update={"examples": stored_location(self.examples), "model": model})

    @property
    def columns(self) -> dict[str, str]:
        """Role -> column name, for every role of the model kind."""
        return {role: self.fields.get(role, role) for role in self.model.roles}

    @property
    def data_format(self) -> str:
        """The examples format, explicit or from the file suffix."""
        return self.examples_format or infer_format(self.examples)


_SUFFIXES = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def infer_format(path: str) -> str | None:
    """``json``/``csv``/``parquet`` from a file name (compression suffixes allowed), else None."""
    name = path.split("?", 1)[0].lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return next((fmt for suffix, fmt in _SUFFIXES.items() if name.endswith(suffix)), None)


# ---------------------------------------------------------------------------------- validation
def validate_spec(cls: type[_Strict], data: Any, source: str = "<dict>"):
    """Validate ``data`` as ``cls``; raise :class:`SpecError` listing every fault.

    Field errors come from pydantic; cross-field rules are evaluated on the raw input as well, so
    a spec with a type error *and* a missing field reports both.
    """
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        faults = pydantic_faults(e for e in exc.errors() if e["type"] != _CROSS)
        faults += _raw_cross_faults(cls, data, "")
        raise SpecError(source, list(dict.fromkeys(faults))) from None


def _raw_cross_faults(cls: type[_Strict], data: Any, prefix: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    faults = [f"{prefix}{f}" for f in cls.cross_faults(_with_defaults(cls, data))]
    for name, field in cls.model_fields.items():
        nested = _nested_spec(field.annotation)
        if nested is not None and isinstance(data.get(name), dict):
            faults += _raw_cross_faults(nested, data[name], f"{prefix}{name}.")
    return faults


def _with_defaults(cls: type[_Strict], data: dict[str, Any]) -> dict[str, Any]:
    merged = {}
    for name, field in cls.model_fields.items():
        if name in data:
            merged[name] = data[name]
        elif not field.is_required():
            merged[name] = field.get_default(call_default_factory=True)
    return merged


def _nested_spec(annotation: Any) -> type[_Strict] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, _Strict)), None)


def read_spec_file(path: str | Path) -> Any:
    """Parse a JSON or YAML file (by suffix; YAML accepts JSON too) into Python data."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), ["no such file; give the path of a JSON or YAML spec"])
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            str(path), [f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"]
        ) from None


def load_model_spec(source: str | Path | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A validated :class:`ModelSpec` from a spec, a dict, or a JSON/YAML file.

    Relative ``path`` / ``tokenizer.path`` in a file are resolved against the file's directory.

    Raises:
        SpecError: listing every fault at once.
    """
    if isinstance(source, (ModelSpec, dict)):
        return validate_spec(ModelSpec, source)
    data = read_spec_file(source)
    if isinstance(data, dict):
        data = _resolve_relative(data, folder_of(source))
    return validate_spec(ModelSpec, data, str(source))


def _resolve_relative(data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = dict(data)
    if isinstance(data.get("path"), str):
        data["path"] = absolute_location(data["path"], base)
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("path"), str):
        data["tokenizer"] = dict(tokenizer, path=absolute_location(tokenizer["path"], base))
    return data
