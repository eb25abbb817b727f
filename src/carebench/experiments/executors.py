"""Executors: run many training runs at once, locally in worker processes or as tasks on a Ray cluster.

Why these choices:
- **Persistent local workers.** Importing torch + Lightning costs about 6 CPU-seconds, as much as a whole quick
  LSTM run. Each local worker is one Python process (`worker_main`) that imports once and
  then trains the runs it is sent, one at a time, over a line-based JSON pipe. A run that fails (exception) is
  reported and its worker exits, so the next run starts in a fresh process; a worker that dies (segfault, out of
  memory) fails exactly the run it was on, because each worker holds one run at a time.
- **Threads per job.** Every worker limits torch to `threads` intra-op threads (default: cores // jobs), so
  `--jobs N` never oversubscribes the CPU.
- **Kill safety.** A worker asks the kernel to kill it when the benchmark process dies (Linux
  PR_SET_PDEATHSIG), so a SIGKILLed benchmark leaves no orphan training. Independently, each run is trained
  under an exclusive lock on `RUNS/.locks/<run_id>.lock` (flock; released by the kernel when the holder dies),
  so two processes never write the same run, even with two benchmarks on one runs directory or an orphan on a
  system without PDEATHSIG (`runs.run_lock`).
- **Ray** (optional extra): one task per run with `num_cpus = threads` (and `num_gpus` for GPU runs); Ray does the
  scheduling across machines. The runs directory and the dataset must be on storage every node sees.

Every executor yields `Started(run_id)` and `Finished(outcome)` events to the runner, which owns the progress bar,
the index and the failure logs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carebench import runs
from carebench.errors import UserError
from carebench.training.config import TrainConfig

LOGS = ".logs"
EXECUTORS = ("local", "ray")
WORKER = "from carebench.experiments.executors import worker_main; worker_main()"


class ExecutorError(UserError, RuntimeError):
    """An executor cannot start (unknown name, Ray not installed or not reachable, bad --jobs/--threads)."""


@dataclass
class Outcome:
    """How one run ended: `ok` with a finished record, or failed with a one-line `error` (details in its log)."""

    run_id: str
    ok: bool
    seconds: float
    error: str = ""
    log: Path | None = None


@dataclass
class Started:
    run_id: str


@dataclass
class Finished:
    outcome: Outcome


Event = Started | Finished


# ------------------------------------------------------------------------------------------ shared mechanics
def available_cores() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, jobs))


def execute_run(cfg: TrainConfig, runs_dir: str | Path) -> bool:
    """Train one run under its lock; False when it was already finished by someone else."""
    from carebench.training.run import train_run

    with runs.run_lock(runs_dir, cfg.run_id):
        if runs.is_done(runs_dir, cfg.run_id):
            return False
        try:
            train_run(cfg, runs_dir)
        except BaseException:
            shutil.rmtree(runs.partial_dir(runs_dir, cfg.run_id), ignore_errors=True)  # the log tells why
            raise
        return True


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors, so C-level and Lightning output too) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_logged(config_yaml: str, run_id: str, runs_dir: str, log: str) -> dict[str, Any]:
    """Train one run with its output in `log`; never raises (the error is returned). Used by both executors."""
    t0 = time.perf_counter()
    with _output_to(Path(log)):
        try:
            cfg = TrainConfig.from_yaml_text(config_yaml, f"configuration sent for {run_id}")
            if cfg.run_id != run_id:
                raise RuntimeError(f"the configuration sent for {run_id} hashes to {cfg.run_id}")
            execute_run(cfg, runs_dir)
            ok, error = True, ""
        except Exception as e:
            traceback.print_exc()
            ok, error = False, (f"{type(e).__name__}: {e}".strip().splitlines() or ["failed"])[0]
    return {"run_id": run_id, "ok": ok, "seconds": time.perf_counter() - t0, "error": error}


def _log_path(runs_dir: Path, run_id: str) -> Path:
    folder = runs_dir / LOGS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{run_id}.log"


# --------------------------------------------------------------------------------------------- local workers
def _drop_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent (the benchmark or tune process) dies (no-op elsewhere; the
    locks and the study's heartbeats still hold)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def worker_main(argv: list[str] | None = None) -> None:
    """A local worker: read one JSON request per line on stdin, train it, answer one JSON line on stdout."""
    ap = argparse.ArgumentParser(prog="carebench-worker")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle; it stops the workers
    die_with_parent(args.parent)
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed outside a run goes to the worker's log, never into the answer pipe

    import torch

    import carebench.training.run  # noqa: F401  (imported once per worker: the point of a persistent worker)

    torch.set_num_threads(args.threads)
    while line := sys.stdin.readline():
        req = json.loads(line)
        res = run_logged(req["config"], req["run_id"], args.runs, req["log"])
        answer.write(json.dumps(res) + "\n")
        if not res["ok"]:
            break  # the next run gets a fresh process


@dataclass
class _Worker:
    proc: subprocess.Popen
    log: Path
    buffer: bytes = b""
    run: TrainConfig | None = None
    run_log: Path | None = None
    started: float = 0.0
    retiring: bool = False  # exits after a failed run: nothing more is sent to it


class LocalExecutor:
    """`jobs` persistent worker processes on this machine, each with `threads` torch threads."""

    name = "local"

    def __init__(self, jobs: int = 1, threads: int | None = None) -> None:
        if jobs < 1:
            raise ExecutorError(f"--jobs must be >= 1, got {jobs}")
        if threads is not None and threads < 1:
            raise ExecutorError(f"--threads must be >= 1, got {threads}")
        self.jobs = jobs
        self.threads = threads or threads_per_job(jobs)

    def start(self) -> None:
        pass

    def _spawn(self, runs_dir: Path, n: int) -> _Worker:
        log = _log_path(runs_dir, f"worker-{os.getpid()}-{n}")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        }
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    "--runs",
                    str(runs_dir),
                    "--threads",
                    str(self.threads),
                    "--parent",
                    str(os.getpid()),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        os.set_blocking(proc.stdout.fileno(), False)
        return _Worker(proc, log)

    def execute(self, configs: list[TrainConfig], runs_dir: str | Path) -> Iterator[Event]:
        runs_dir = Path(runs_dir).absolute()
        pending = deque(configs)
        workers: list[_Worker] = []
        sel = selectors.DefaultSelector()
        spawned = 0
        try:
            while pending or any(w.run for w in workers):
                while pending and sum(1 for w in workers if w.run) < self.jobs:
                    idle = next((w for w in workers if w.run is None and not w.retiring), None)
                    if idle is None:
                        idle = self._spawn(runs_dir, spawned)
                        spawned += 1
                        workers.append(idle)
                        sel.register(idle.proc.stdout, selectors.EVENT_READ, idle)
                    cfg = dataclasses.replace(pending.popleft(), threads=self.threads)  # not in the run id
                    idle.run, idle.run_log, idle.started = (
                        cfg,
                        _log_path(runs_dir, cfg.run_id),
                        time.perf_counter(),
                    )
                    req = {"run_id": cfg.run_id, "config": cfg.to_yaml(), "log": str(idle.run_log)}
                    try:
                        idle.proc.stdin.write((json.dumps(req) + "\n").encode())
                        idle.proc.stdin.flush()
                    except BrokenPipeError:
                        pass  # the worker is gone: noticed below as end of file
                    yield Started(cfg.run_id)
                for key, _ in sel.select(timeout=0.5):
                    w: _Worker = key.data
                    chunk = os.read(w.proc.stdout.fileno(), 65536)
                    if chunk:
                        w.buffer += chunk
                        while b"\n" in w.buffer:
                            line, w.buffer = w.buffer.split(b"\n", 1)
                            res = json.loads(line)
                            w.retiring = not res["ok"]
                            yield Finished(self._finish(w, res["ok"], res["error"], res["seconds"]))
                        continue
                    sel.unregister(w.proc.stdout)  # end of file: the worker exited
                    rc = w.proc.wait()
                    workers.remove(w)
                    if w.run is not None:
                        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                        yield Finished(
                            self._finish(
                                w,
                                False,
                                f"worker process died ({how}); see the log",
                                time.perf_counter() - w.started,
                                extra=w.log,
                            )
                        )
                    _drop_if_empty(w.log)
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        w.proc.stdin.close()
                    w.proc.kill()
                w.proc.wait()
                w.proc.stdout.close()
                _drop_if_empty(w.log)
            sel.close()

    @staticmethod
    def _finish(w: _Worker, ok: bool, error: str, seconds: float, extra: Path | None = None) -> Outcome:
        """The worker measures a run's own time (without its one-off start-up), which is what the ETA needs."""
        assert w.run is not None and w.run_log is not None
        if extra is not None and extra.is_file():  # a dead worker's own output explains the failure
            with open(w.run_log, "ab") as fh:
                fh.write(b"\n--- worker output ---\n" + extra.read_bytes())
        out = Outcome(w.run.run_id, ok, seconds, error, w.run_log)
        w.run = w.run_log = None
        return out


# ------------------------------------------------------------------------------------------------------- ray
def _ray_task(config_yaml: str, run_id: str, runs_dir: str, log: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return run_logged(config_yaml, run_id, runs_dir, log)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'carebench[ray]'") from None
    return ray


class RayExecutor:
    """One Ray task per run (`num_cpus = threads`), at most `jobs` in flight; connects to `address` if given
    (or RAY_ADDRESS), otherwise starts a local Ray instance, or uses the one already initialised."""

    name = "ray"

    def __init__(
        self, jobs: int | None = None, threads: int | None = None, address: str | None = None
    ) -> None:
        if jobs is not None and jobs < 1:
            raise ExecutorError(f"--jobs must be >= 1, got {jobs}")
        if threads is not None and threads < 1:
            raise ExecutorError(f"--threads must be >= 1, got {threads}")
        self.ray = import_ray()
        self._jobs, self._threads, self.address = jobs, threads, address
        self.jobs, self.threads = jobs or 1, threads or 1
        self._owns = False

    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(
                address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False
            )
            self._owns = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        biggest = max(node_cpus or [cpus])
        if self._threads is None:
            self.threads = min(biggest, threads_per_job(self._jobs, cpus)) if self._jobs else 1
        self.jobs = self._jobs or max(1, cpus // self.threads)

    def execute(self, configs: list[TrainConfig], runs_dir: str | Path) -> Iterator[Event]:
        ray = self.ray
        runs_dir = Path(runs_dir).absolute()
        pending = deque(configs)
        inflight: dict[Any, tuple[TrainConfig, Path, float]] = {}
        task = ray.remote(_ray_task)
        try:
            while pending or inflight:
                while pending and len(inflight) < self.jobs:
                    cfg = dataclasses.replace(pending.popleft(), threads=self.threads)  # not in the run id
                    gpus = (
                        cfg.devices
                        if cfg.accelerator in ("gpu", "cuda") and isinstance(cfg.devices, int)
                        else 0
                    )
                    log = _log_path(runs_dir, cfg.run_id)
                    ref = task.options(num_cpus=self.threads, num_gpus=gpus, max_retries=0).remote(
                        cfg.to_yaml(), cfg.run_id, str(runs_dir), str(log), self.threads
                    )
                    inflight[ref] = (cfg, log, time.perf_counter())
                    yield Started(cfg.run_id)
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    cfg, log, t0 = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                        ok, error = res["ok"], res["error"]
                    except Exception as e:  # the task's process died (RayTaskError, WorkerCrashedError, ...)
                        ok, error = False, f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                        with open(log, "a") as fh:
                            fh.write(f"\n--- Ray ---\n{e}\n")
                    yield Finished(Outcome(cfg.run_id, ok, time.perf_counter() - t0, error, log))
        finally:
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            if self._owns:
                ray.shutdown()


def make_executor(
    name: str, jobs: int | None = None, threads: int | None = None, address: str | None = None
) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor(1 if jobs is None else jobs, threads)
    if name == "ray":
        return RayExecutor(jobs, threads, address)
    raise ExecutorError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
