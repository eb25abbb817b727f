"""`analysis.parallel`: worker processes see what the analysing process set up (shared objects, declared tasks)."""

from __future__ import annotations

import pytest

from carebench.analysis.parallel import Workers, shared_value
from carebench.tasks import _DECLARED, declare_tasks, get_task, task_from_mapping


def _task_and_shared(name: str) -> tuple[str, int, str]:
    spec = get_task(name)
    return spec.kind, spec.num_outputs, shared_value("tag")


@pytest.fixture
def acuity():
    declare_tasks(
        [task_from_mapping("acuity_test", {"kind": "multiclass", "class_names": ["low", "mid", "high"]})]
    )
    yield "acuity_test"
    _DECLARED.pop("acuity_test", None)


def test_workers_know_the_tasks_declared_before_the_pool_started(acuity):
    """A dataset's own task is declared in the analysing process only; each worker gets it at start-up (without it,
    `get_task` fails in the worker and e.g. the fairness of that task's runs is skipped)."""
    with Workers(2, shared={"tag": "x"}) as pool:
        out = list(pool.map(_task_and_shared, [acuity, acuity, "mortality"]))
    assert out == [("multiclass", 3, "x"), ("multiclass", 3, "x"), ("binary", 1, "x")]
