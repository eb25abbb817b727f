"""Independent pieces of the analysis on several cores: `Workers` and `parallel_map`.

Why processes and this shape: the analysis is a long list of independent, deterministic computations (one method
pair's bootstrap and permutation test, one method's bootstrap, one run's fairness, one run's forward passes), each
seeded from the analysis seed and its own inputs only. Mapping them over worker processes therefore gives exactly
the tables of a serial run (tests/test_analyze.py compares them), up to `jobs` times faster. Results come back in
input order.

One pool serves a whole `analyze` (`Workers`, a context manager): starting a worker costs its imports (numpy,
pandas, scipy, carebench: about a second), which would otherwise be paid again at every stage. Workers are
started with the `forkserver` method (`spawn` where it does not exist), never plain `fork`: the analysis process
may already run torch's or a BLAS's thread pools, which a forked child would inherit broken. Each worker uses one
intra-op thread (OMP_NUM_THREADS=1 and friends, read by torch and the BLAS as they load), so `jobs` workers use
`jobs` cores. `shared` objects (e.g. the cohort's groups) are sent once per worker, not once per item
(`shared_value`), and so are the tasks the parent process has declared (a dataset's own tasks).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from carebench.tasks import declared_specs

T = TypeVar("T")
R = TypeVar("R")

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_SHARED: dict[str, Any] = {}


def default_jobs() -> int:
    """The CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def shared_value(name: str) -> Any:
    """An object given to `Workers(shared={name: ...})`, in the worker (or the serial process)."""
    return _SHARED[name]


def _start(shared: dict[str, Any], tasks: list[Any]) -> None:
    from carebench.tasks import declare_tasks

    _SHARED.update(shared)
    declare_tasks(tasks)  # the tasks the analysed dataset declares, as in the parent process


class Workers:
    """A pool of `jobs` worker processes, started on first use and stopped on exit; `jobs` <= 1 maps serially
    in this process."""

    def __init__(self, jobs: int = 1, shared: dict[str, Any] | None = None) -> None:
        self.jobs = max(1, int(jobs))
        self.shared = dict(shared or {})
        self._pool: ProcessPoolExecutor | None = None
        _SHARED.update(self.shared)  # the serial path (and small maps) run here

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            saved = {k: os.environ.get(k) for k in _THREAD_VARS}
            os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))  # read by the workers' libraries as they load
            try:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.jobs,
                    mp_context=ctx,
                    initializer=_start,
                    initargs=(self.shared, declared_specs()),
                )
                for _ in self._pool.map(_noop, range(self.jobs)):  # start them now, with this environment
                    pass
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._pool

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`map(fn, items)` on the workers, results in input order (serial for jobs <= 1 or a single item).
        `fn`, the items and the results must be picklable (module-level functions, arrays, frames)."""
        items = list(items)
        if self.jobs <= 1 or len(items) <= 1:
            return map(fn, items)
        return self._executor().map(fn, items)


def _noop(_: int) -> None:
    return None


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: Workers | int) -> Iterator[R]:
    """`workers.map(fn, items)`; an int starts a pool of that many workers for this call only."""
    if isinstance(workers, Workers):
        return workers.map(fn, items)
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return map(fn, items)

    def run() -> Iterator[R]:
        with Workers(workers) as pool:
            yield from pool.map(fn, items)

    return run()
