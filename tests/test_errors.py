"""Every exception class of the project survives pickling (Ray sends a worker's error to its
driver pickled) with its message, type and attributes."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import cloudpickle
import pytest

import engine
import serve
from engine.errors import AdapterError


def _modules():
    for package in (engine, serve):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            yield info.name


def project_error_classes() -> list[type[BaseException]]:
    classes = {}
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.split(".")[0] in ("engine", "serve")
            ):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    return [classes[k] for k in sorted(classes)]


def _sample(name: str, annotation) -> object:
    """A value for one constructor argument, from its annotation (strings under postponed evaluation)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    if "AdapterError" in text:
        return [AdapterError("runs/a", "no adapter_config.json"), AdapterError("runs/b", "bad rank")]
    if "Sequence" in text or "list" in text:
        return [f"{name}: first fault", f"{name}: second fault"]
    if text == "int":
        return 418
    if text == "bool":
        return True
    if "str" in text:
        return f"the {name}"
    raise AssertionError(f"no sample value for argument {name}: {text}; extend _sample")


def instance(cls: type[BaseException]) -> BaseException:
    signature = inspect.signature(cls.__init__)
    params = [p for n, p in signature.parameters.items() if n != "self"]
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return cls("something went wrong: see the cause")
    args = [_sample(p.name, p.annotation) for p in params if p.default is p.empty]
    return cls(*args)


CLASSES = project_error_classes()


def test_the_walk_finds_the_project_errors():
    names = {c.__name__ for c in CLASSES}
    assert {"IcmfError", "ExamplesError", "SpecError", "IngestError", "ApiError", "LoadError"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_every_error_class_round_trips_through_pickle(cls, dumps):
    error = instance(cls)
    copy = pickle.loads(dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and str(copy)
    assert repr(vars(copy)) == repr(vars(error))  # attributes too (status, faults, source...)
