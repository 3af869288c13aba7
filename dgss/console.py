"""dgss's own messages: through the ``dgss`` logger, which Hydra's job logging sends to the console and to the run's
``<task>.log`` (Lightning's logger keeps to the console), from rank 0 only."""

from __future__ import annotations

import io
import logging
import shutil

from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

log = logging.getLogger("dgss")


def info(message: str) -> None:
    if rank_zero_only.rank == 0:
        log.info(message)


def warning(message: str) -> None:
    if rank_zero_only.rank == 0:
        log.warning(message)


def show(renderable, width: int | None = None) -> None:
    """A rich table (or any renderable) as plain text, logged like :func:`info`."""
    if rank_zero_only.rank != 0:
        return
    buffer = io.StringIO()
    Console(file=buffer, width=width or min(shutil.get_terminal_size((120, 24)).columns, 160), color_system=None,
            force_terminal=False).print(renderable)  # fmt: skip
    log.info("\n" + buffer.getvalue().rstrip())
