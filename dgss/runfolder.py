"""One run per run folder: a lock naming its holder, and no silent overwrite of a run that is there.

``dgss-train run_name=X`` writes into ``logs/train/runs/X``. Two processes started with the same name would write
one folder at once (checkpoints, CSV rows and the "best" file interleaved), and a second start of a finished run
without ``resume=auto`` would write over its checkpoints and metrics. So:

- the process that trains (global rank 0) holds ``<run>/.lock`` for the whole run: its pid, host, SLURM job and
  start. A second run into the folder is refused in one line naming the holder. A lock is stale, and taken over with
  a warning, when its process is gone (same host: the pid is not running, or runs a later-started process), or when
  it was left by this very SLURM job before a requeue. A lock from another host that cannot be checked is reported
  with the command that removes it.
- a folder that already holds a run's results (checkpoints, ``metrics.json``) is continued with ``resume=auto``
  (or ``ckpt_path=``), or started over with an explicit ``overwrite=true``, which removes those results first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from dgss.errors import ConfigError
from dgss.preemption import slurm_job_id

log = logging.getLogger("dgss.train")

LOCK_NAME = ".lock"
#: what a run leaves in its folder (removed by overwrite=true); the Hydra files and logs are rewritten anyway
RESULTS = ("checkpoints", "metrics.json", "iou.csv", "csv", "wandb_run_id", "fishertune_mask.pt")
FORBIDDEN = ("/", "\\", "\0")


def check_run_name(name: Any) -> None:
    """``run_name`` is one folder name: not empty, no path separator, not ``.`` / ``..``, no control characters."""
    if name is None:
        return
    text = str(name)
    bad = ([c for c in text if c in FORBIDDEN or ord(c) < 32 or ord(c) == 127] or
           (["."] if text.strip() in ("", ".", "..") else []))  # fmt: skip
    if bad:
        raise ConfigError(f"run_name={text!r} is not a folder name (it holds {bad[0]!r}); use letters, digits, "
                          "'-', '_' and '.', e.g. run_name=rein_gta_seed1")  # fmt: skip


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc), None where that cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_id(),
            "start": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def stale(other: dict[str, Any]) -> str | None:
    """Why the lock ``other`` is left over (its holder is gone), or None while it may still be running."""
    if other.get("slurm_job") and other["slurm_job"] == slurm_job_id():
        return f"left by this SLURM job ({other['slurm_job']}) before it was requeued"
    if other.get("host") != socket.gethostname():
        return None  # another machine: nothing to check from here
    pid = int(other.get("pid", -1))
    if pid == os.getpid():
        return "left by this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # runs, as another user
    if other.get("start") is not None and _start_time(pid) not in (None, other["start"]):
        return f"process {pid} is gone (its pid now belongs to another process)"
    return None


class RunLock:
    """``with RunLock(folder):`` holds ``folder/.lock`` (see the module docstring); ``enabled=False`` (ranks > 0)
    does nothing."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled, self.held = Path(folder) / LOCK_NAME, enabled, False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.created = not self.path.parent.exists()  # removed again if the run leaves nothing in it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self.held = True
            return self
        raise ConfigError(f"could not lock the run folder {self.path.parent}: another run keeps taking it")

    def _take_over_or_refuse(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            if not isinstance(other, dict):
                raise ValueError
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            other, why = {}, "unreadable"
        else:
            why = stale(other)
        if why is None:
            job = f", SLURM job {other['slurm_job']}" if other.get("slurm_job") else ""
            raise ConfigError(f"the run folder {self.path.parent} is in use by process {other.get('pid')} on "
                              f"{other.get('host')}{job} since {other.get('since')}: one run per folder; use another "
                              f"run_name, wait for that run, or, if it is gone, remove {self.path}")  # fmt: skip
        log.warning(f"run folder {self.path.parent}: taking over a stale lock ({why})")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.held = False
        try:
            mine = json.loads(self.path.read_text()).get("pid") == os.getpid()
        except (OSError, ValueError, AttributeError):
            mine = False
        if mine:
            self.path.unlink(missing_ok=True)
        if getattr(self, "created", False):
            try:
                self.path.parent.rmdir()  # only if empty: a run refused before it wrote anything leaves no folder
            except OSError:
                pass


def previous_results(folder: str | os.PathLike) -> list[str]:
    """What an earlier run left in ``folder``: checkpoints and metrics (names), empty for a fresh folder."""
    folder = Path(folder)
    found = (
        sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt"))
        if (folder / "checkpoints").is_dir()
        else []
    )
    return [*(f"checkpoints/{n}" for n in found), *(n for n in ("metrics.json",) if (folder / n).is_file())]


def check_fresh(folder: str | os.PathLike, overwrite: bool, resuming: bool) -> None:
    """A run that does not resume starts in a folder without another run's results: refused in one line, or with
    ``overwrite`` those results removed first."""
    if resuming:
        return
    found = previous_results(folder)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
        raise ConfigError(f"the run folder {folder} already holds a run ({shown}): continue it with resume=auto, start "
                          "it over with overwrite=true (removes its checkpoints and metrics), or use another "
                          "run_name")  # fmt: skip
    for name in RESULTS:
        p = Path(folder) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    log.warning(f"overwrite=true: removed the previous run's results in {folder} ({len(found)} files)")
