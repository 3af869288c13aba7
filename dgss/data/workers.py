"""What every DataLoader worker dgss starts does first: leave preemption to the main process.

Schedulers signal a whole job, not one process: SLURM's preemption and ``scancel``, ``timeout``, container runtimes
and a terminal's Ctrl-C send SIGTERM / SIGINT to every process of the job's process group, loader workers included.
A worker that dies of it makes the main process fail with "DataLoader worker ... killed by signal" before it reaches
its safe point, and the checkpoint is never written. Workers therefore ignore the signals the main process acts on
(:class:`dgss.preemption.Preemption`); they still exit with the main process (PyTorch's workers watch their parent)
and SIGKILL still ends them. At the main process's exit they are killed (:func:`_end_workers`): Python's own
exit handler would send them SIGTERM and wait for ever.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit handler registered before ours, so ours runs first)
import os
import signal
import time

from lightning.fabric.utilities.seed import pl_worker_init_function

#: the signals the main process owns (dgss.preemption acts on them)
OWNED_BY_MAIN = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every dgss DataLoader: ignore :data:`OWNED_BY_MAIN`; Lightning's worker seeding
    (``seed_everything(workers=True)``) still runs, as it would without a ``worker_init_fn``."""
    for sig in OWNED_BY_MAIN:
        signal.signal(sig, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id)


def _end_workers() -> None:
    """At exit, before ``multiprocessing``'s handler (registered earlier, so it runs later), which terminates daemonic
    children with SIGTERM and then waits for them: these workers ignore SIGTERM (or are just starting and will), so
    it would wait for ever. Each daemonic child gets SIGTERM as there, a second to go, then SIGKILL."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    # PyTorch's SIGCHLD handler raises in the main process for a worker killed by a signal: at exit that is
    # expected, and an error raised inside this loop would leave the other workers to the waiting handler
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.terminate()
    deadline = time.monotonic() + 1.0
    for p in children:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


atexit.register(_end_workers)
