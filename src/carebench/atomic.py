"""Outputs that appear whole or not at all, and the clean-up of what a killed process of ours left behind.

Why: carebench runs on shared servers where jobs are killed (SIGKILL leaves no chance to clean up) and disks fill
up. Every command that writes a directory (`prepare`, `synth`, `analyze`, `report`) or an index file
(`benchmark`'s runs.csv and plan.yaml) writes into a temporary sibling and renames it into place when complete, so
a reader never sees half of it and a failure leaves the previous content as it was.

- **Owner marker.** A temporary directory `.<name>.tmp-<random>` holds `.carebench-owner.json`: the host, the
  process id and that process's start time. A temporary file carries `<pid>@<host>` in its name. Before writing
  `out`, `output_dir` deletes the temporaries of `out` whose owner is a process of this host that no longer runs
  (same pid but another start time counts as gone: the pid was reused). A temporary without our marker, of a live
  process or of another host (a shared file system) is never touched.
- **The swap.** Replacing an existing `out` renames it to `.<name>.old-<pid>@<host>`, renames the new one into
  place, then deletes the old one. A process killed between the two renames leaves no `out`: the next
  `output_dir` of `out` renames the old one back (the previous state), or deletes it if the new one made it.
- **Errors.** A full disk, a quota, a read-only or too-large file while writing (`WRITE_ERRNOS`) becomes one
  `OutputError` naming the output, raised after the temporary is removed; parent directories created for the
  output are removed again when empty.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from carebench.errors import UserError

MARKER = ".carebench-owner.json"
# errno values that mean "the output cannot be written here", whatever the input
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class OutputError(UserError, OSError):
    """An output could not be written (disk full, quota, read-only file system). The message names the output and
    says what was left as it was. The CLI exits with status 1 (not a bad input, a failed write)."""

    exit_code = 1


def _host() -> str:
    return socket.gethostname()


def _started(pid: int) -> float | None:
    """Start time of process `pid` (seconds since the epoch), None when no such process runs."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it runs, as another user
        return -1.0


def owner() -> dict[str, Any]:
    """This process, as written into a temporary directory's marker."""
    return {"host": _host(), "pid": os.getpid(), "started": _started(os.getpid())}


def owner_gone(info: dict[str, Any]) -> bool:
    """True only when `info` names a process of this host that no longer runs (or whose pid was reused)."""
    if info.get("host") != _host() or not isinstance(info.get("pid"), int):
        return False
    started = _started(info["pid"])
    if started is None:
        return True
    recorded = info.get("started")
    return isinstance(recorded, int | float) and started >= 0 and abs(started - recorded) > 1.0


def _tag() -> str:
    return f"{os.getpid()}@{_host()}"


def _tag_gone(tag: str) -> bool:
    """`<pid>@<host>` of a temporary file or old directory: True when that process of this host is gone."""
    pid, sep, host = tag.partition("@")
    if not sep or not pid.isdigit():
        return False
    return host == _host() and _started(int(pid)) is None


def clean_stale(out: str | Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what a dead process of ours left next to `out`; restore `out` from an interrupted swap.

    Returns the paths removed or restored. Only names this module makes are looked at, and only when their owner
    is a dead process of this host (module docstring).
    """
    out = Path(out).absolute()
    parent = out.parent
    if not parent.is_dir():
        return []
    done: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        entries = []
    tmp_prefix, old_prefix = f".{out.name}.tmp-", f".{out.name}.old-"
    for p in entries:
        name = p.name
        if name.startswith(tmp_prefix):
            if p.is_dir() and not p.is_symlink():
                try:
                    info = json.loads((p / MARKER).read_text())
                except (OSError, ValueError):
                    continue  # not ours (or not readable): leave it
                if isinstance(info, dict) and owner_gone(info):
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(p)
            elif p.is_file() and _tag_gone(name[len(tmp_prefix) :]):
                p.unlink(missing_ok=True)
                done.append(p)
        elif name.startswith(old_prefix) and p.is_dir() and not p.is_symlink():
            if not _tag_gone(name[len(old_prefix) :]):
                continue
            if out.exists():
                shutil.rmtree(p, ignore_errors=True)  # the swap completed; only the deletion was cut short
            else:
                os.rename(p, out)  # killed between the two renames: the previous content comes back
            done.append(p)
    if done and log is not None:
        log(
            f"removed {len(done)} temporary file(s) or folder(s) of {out} left by an earlier carebench "
            f"process that no longer runs"
        )
    return done


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, outermost first."""
    missing = []
    for p in path.parents:
        if p.exists():
            break
        missing.append(p)
    return missing[::-1]


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def write_failure(e: OSError, target: Path, previous: bool) -> OutputError:
    """The one-line error of a failed write to `target` (file or directory)."""
    state = f"the previous {target.name} is unchanged" if previous else f"nothing was written to {target}"
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return OutputError(
        f"{target}: writing failed: {e.strerror or e}{where}; the temporary copy was removed and {state} "
        f"(expected free space and a writable file system; free some and re-run)"
    )


def make_parents(path: Path, option: str = "") -> list[Path]:
    """Create the missing parent directories of `path`; return them (to be removed on failure). A parent that is a
    file or cannot be created is an OutputError naming `option` (when given) and the parent."""
    created = _missing_parents(path)
    for d in created:
        try:
            d.mkdir()
        except OSError as e:
            _remove_empty([c for c in created if c.exists()])
            label = f"{option} {path}" if option else str(path)
            why = e.strerror or str(e)
            raise OutputError(f"{label}: cannot create the directory {d}: {why}") from None
    return created


@contextlib.contextmanager
def output_dir(
    out: str | Path, overwrite: bool = False, log: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out`; on success rename it to `out`, on failure delete it.

    An existing `out` is an error unless `overwrite` (FileExistsError, as before), and is replaced only once the new
    one is complete. Stale temporaries of dead carebench processes are removed first (`clean_stale`).
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory (expected an output directory)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists (pass --overwrite to replace it)")
    clean_stale(out, log)
    existed = out.exists()
    created = make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        (tmp / MARKER).write_text(json.dumps(owner()))
    except OSError as e:
        _remove_empty(created)
        if e.errno in WRITE_ERRNOS:
            raise write_failure(e, out, existed) from None
        raise
    try:
        yield tmp
        (tmp / MARKER).unlink()
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{_tag()}")
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(out, trash)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(trash, out)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if e.errno in WRITE_ERRNOS:
            raise write_failure(e, out, existed) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary sibling `.<name>.tmp-<pid>@<host>`, then a rename. A failed
    write removes the temporary and leaves the previous file as it was (OutputError for a full disk)."""
    path = Path(path)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{_tag()}")
    existed = path.exists()
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise write_failure(e, path, existed) from None
        raise
