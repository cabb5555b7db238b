"""raise_task_faults: the one way faults collected over several tasks are raised."""

from __future__ import annotations

import pytest

from engine.errors import CatalogError
from engine.tasks.errors import TaskError, raise_task_faults


def test_no_fault_raises_nothing():
    raise_task_faults([], "cannot be planned")


def test_a_single_fault_keeps_its_type():
    with pytest.raises(CatalogError, match="only one"):
        raise_task_faults([CatalogError("only one")], "cannot be planned")


def test_several_faults_are_listed_in_one_task_error():
    with pytest.raises(TaskError) as info:
        raise_task_faults([TaskError("a: empty"), CatalogError("b: missing")], "cannot be planned")
    assert str(info.value) == "2 task(s) cannot be planned:\n  - a: empty\n  - b: missing"
