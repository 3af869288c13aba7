"""What every console script shares: argument checks before Hydra, the runner that turns user errors into one line
(``dgss-train``, ``dgss-eval``, ``dgss-predict``, ``dgss-merge``)."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from dgss.errors import ConfigError, TrainingAborted
from dgss.preemption import Preempted


def first_line(err: BaseException) -> str:
    """An error's message as one line. An error raised in a DataLoader worker arrives as "Caught ConfigError in
    DataLoader worker process 1." plus the worker's traceback: its own message (which names the file) is the last
    line of that traceback."""
    text = str(err).strip()
    worker = re.match(r"Caught (\w+) in DataLoader worker process \d+\.", text)
    if worker:
        found = re.findall(rf"^(?:[\w.]+\.)?{worker.group(1)}: (.+)$", text, re.M)
        if found:
            return found[-1].strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error caused by user input, else None (a bug: show the traceback)."""
    chain, full_key = [], None
    while e is not None:
        chain.append(e)
        e = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
    for err in chain:
        if isinstance(err, InstantiationException) and "full_key:" in str(err):
            full_key = str(err).rsplit("full_key:", 1)[1].strip().splitlines()[0]
    for err in chain:
        if isinstance(err, (ConfigError, TrainingAborted, MisconfigurationException)):
            return first_line(err)
    for err in chain:
        if isinstance(err, InstantiationException) and err.__cause__ is None:
            return first_line(err)
    for err in chain[1:]:
        if isinstance(err, (TypeError, ValueError)) and full_key:
            msg = first_line(err)
            m = re.search(r"unexpected keyword argument '(\w+)'", msg)
            if m:  # e.g. experiment=demo (FisherTune keys) with method=frozen
                return (f"{full_key} does not take the key {m.group(1)!r} (set for another {full_key} by an "
                        f"experiment or override); drop it with ~{full_key}.{m.group(1)}")  # fmt: skip
            return f"bad value for {full_key}: {msg}"
    return None


def run_cli(task: Callable[[DictConfig], Any], cfg: DictConfig, prog: str) -> Any:
    """Run ``task``; user errors exit with one line (DGSS_DEBUG=1 shows the traceback), work is never lost:
    loggers are closed in every case."""
    try:
        return task(cfg)
    except Preempted as e:
        # the checkpoint is written; the job is requeued or the user reruns with resume=auto
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        msg = user_error(e)
        if msg is None or os.environ.get("DGSS_DEBUG"):
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        wandb = sys.modules.get("wandb")  # only where a run imported it (None: import blocked)
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


# ------------------------------------------------------------------------------------------------ before Hydra
def _config_dirs(argv: list[str]) -> list[Path]:
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]).expanduser())
    return dirs


def check_argv(argv: list[str]) -> None:
    """What Hydra would report as a traceback or a screenful, as one :class:`ConfigError` line: a ``--config-dir``
    that is missing, a YAML file in it that is not text, not YAML or not a mapping, and a config choice
    (``experiment=nme``) that exists in no config folder."""
    import yaml

    packaged = Path(__file__).resolve().parent.parent / "conf"
    try:
        from importlib.resources import files

        packaged = Path(str(files("dgss.conf")))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    dirs = _config_dirs(argv)
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(
                f"--config-dir {d} is not a folder; point it at the folder holding your config groups"
            )
    roots = [packaged, *dirs]
    groups = {p.name for root in roots if root.is_dir() for p in root.iterdir() if p.is_dir()} - {
        "__pycache__"
    }
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~").removeprefix("override ").strip()
        if group not in groups or "." in group or value in ("", "null"):
            continue
        for choice in value.split(","):  # a multirun sweeps over comma-separated choices
            choice = choice.strip()
            found = [
                root / group / f"{choice}.yaml"
                for root in roots
                if (root / group / f"{choice}.yaml").is_file()
            ]
            if not found:
                options = sorted({p.relative_to(root / group).with_suffix("").as_posix() for root in roots
                                  if (root / group).is_dir() for p in (root / group).rglob("*.yaml")
                                  if not p.name.startswith("_")})  # fmt: skip
                close = difflib.get_close_matches(choice, options, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                shown = ", ".join(options[:12]) + (
                    f" (+{len(options) - 12} more)" if len(options) > 12 else ""
                )
                raise ConfigError(f"{group}={choice}: no such config in {group}/; {hint}choose one of {shown}, "
                                  f"or add {group}/{choice}.yaml under --config-dir")  # fmt: skip
            for f in found:
                if f.is_relative_to(packaged):
                    continue
                try:
                    data = yaml.safe_load(f.read_bytes().decode("utf-8"))
                except UnicodeDecodeError:
                    raise ConfigError(f"{f} is not a text file (YAML expected); fix or remove it") from None
                except yaml.YAMLError as e:
                    mark = getattr(e, "problem_mark", None)
                    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                    what = getattr(e, "problem", None) or str(e).splitlines()[0]
                    raise ConfigError(f"{f} is not valid YAML{where}: {what}; fix it") from None
                if data is not None and not isinstance(data, dict):
                    raise ConfigError(
                        f"{f} holds a {type(data).__name__}, not a mapping of config keys; fix it"
                    )


def entry_point(hydra_main: Callable[[], Any], prog: str) -> Callable[[], Any]:
    """A console script: :func:`check_argv` first (one line and exit 2 on a bad config file or choice), then Hydra."""

    def main() -> Any:
        try:
            check_argv(sys.argv[1:])
        except ConfigError as e:
            if os.environ.get("DGSS_DEBUG"):
                raise
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        return hydra_main()

    main.__doc__ = hydra_main.__doc__
    return main
