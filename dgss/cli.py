"""What every console script shares: argument checks before Hydra, the runner that turns user errors into one line
(``dgss-train``, ``dgss-eval``, ``dgss-predict``, ``dgss-merge``)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dgss.compat import optuna_distribution
from dgss.config import check_types
from dgss.errors import ConfigError, TrainingAborted
from dgss.io import writable_folder
from dgss.options import Options, renamed, schema_for
from dgss.preemption import Preempted
from dgss.runfolder import check_run_name


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
            if m and renamed(f"{full_key}.{m.group(1)}"):
                return f"{full_key}.{m.group(1)} is now called {renamed(f'{full_key}.{m.group(1)}')}"
            if m:  # e.g. experiment=demo (FisherTune keys) with method=frozen
                return (f"{full_key} does not take the key {m.group(1)!r} (set for another {full_key} by an "
                        f"experiment or override); drop it with ~{full_key}.{m.group(1)}")  # fmt: skip
            return f"bad value for {full_key}: {msg}"
    return None


FAILED_JOBS: list[str] = []  # the sweep jobs of this process that ended with a user error (one line each)


def sweep_job() -> str | None:
    """``job <n> (<overrides>)`` when running as one job of a multirun (``-m``, or a config setting multirun such as
    ``hparams_search=optuna``), else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return f"job {hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'})"


def run_cli(task: Callable[[DictConfig], Any], cfg: DictConfig, prog: str) -> Any:
    """Run ``task``; user errors exit with one line (DGSS_DEBUG=1 shows the traceback), work is never lost:
    loggers are closed in every case. In a sweep a job's user error is its own: one line naming the job, the job
    returns None (Optuna records the trial as failed) and the sweep goes on; the command exits 1 at its end
    (:func:`entry_point`)."""
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
        job = sweep_job()
        if job is not None:
            FAILED_JOBS.append(f"{job}: {msg}")
            print(f"{prog}: error in sweep {job}: {msg}; the sweep goes on", file=sys.stderr)
            return (
                None  # Optuna's sweeper records the trial as failed (a NaN would make it raise) and goes on
            )
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
    packaged = Path(__file__).resolve().parent.parent / "conf"
    try:
        packaged = Path(str(files("dgss.conf")))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    if any(a == "--experimental-rerun" or a.startswith("--experimental-rerun=") for a in argv):
        raise ConfigError("--experimental-rerun is refused: it unpickles the named file, which can run any code; "
                          "rerun a job with the overrides in its .hydra/overrides.yaml instead")  # fmt: skip
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


HYDRA_FLAGS = ("-m", "--multirun", "-h", "--help", "-hh", "--hydra-help", "-c", "--cfg", "-i", "--info", "-p",
               "--package", "-sc", "--shell-completion", "--resolve", "--version", "--experimental-rerun")  # fmt: skip
VALUED = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
# flags that print the composed config (``--cfg job``, ``--package <p>``, ``--resolve``): the config is checked as a
# run would check it before it is printed, so what prints is what would run
PRINTS_CONFIG = ("-c", "--cfg", "-p", "--package")


def compose_error(e: BaseException) -> str:
    """One line for an error of composing a config: the key it names, and what is wrong or valid."""
    chain = []
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    err = next(
        (x for x in chain if isinstance(x, OmegaConfBaseException) and getattr(x, "full_key", None)), None
    )
    parse = next((x for x in chain if type(x).__name__ == "OverrideParseException"), None)
    if parse is not None:  # Hydra's override grammar: "LexerNoViableAltException: run_name=straße"
        line = first_line(parse).split(": ", 1)[-1]
        key, _, value = line.partition("=")
        if any(ord(c) > 127 for c in line) and value and value[0] not in "'\"":
            return (f"{line} cannot be read: Hydra's override syntax takes non-ASCII characters only quoted; write "
                    f"\"{key}='{value}'\" (the double quotes for the shell)")  # fmt: skip
        return f"{line} is not a valid override ({first_line(parse).split(':', 1)[0]}); quote a value with special characters: \"{key}='...'\""
    if err is None:
        return first_line(chain[0]).rstrip(".")
    key, msg = err.full_key, str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, AttributeError)) and renamed(key):
        return f"{key} is now called {renamed(key)}"
    if isinstance(err, (ConfigKeyError, AttributeError)):
        owner = getattr(err, "object_type", None)
        valid = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
        hint = f"; valid: {', '.join(valid)}" if valid else ""
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
        return f"{key} is not an option{f' (did you mean {close[0]}?)' if close else ''}{hint}"
    if isinstance(err, ValidationError):
        m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg) or re.match(
            r"Value '(.*)' is not a valid (bool) \(type (\w+)\)", msg
        )
        if m:
            value, given, want = (
                m.groups() if m.re.pattern.startswith("Value '(.*)' of") else m.group(1, 3, 2)
            )
            kind = {"Integer": "int", "Float": "float", "Boolean": "bool", "String": "str"}.get(want, want)
            shown = repr(value) if given == "str" else value
            return f"{key}={shown} must be {kind}"
    return f"{key}: {msg}"


def check_compose(config_name: str, argv: list[str]) -> None:
    """Compose the config as Hydra will, before Hydra runs: a misspelt key or a value of the wrong type (the
    methods' options have typed schemas) becomes one :class:`ConfigError` line naming the key, and the methods'
    ``Literal`` choices are checked (dgss.options); also before ``--cfg job`` prints the config. Skipped for Hydra's
    informational flags (``--help``, ``--info``, ...)."""
    informational = tuple(f for f in HYDRA_FLAGS if f not in (*MULTIRUN_FLAGS, *PRINTS_CONFIG, "--resolve"))
    if any(a in informational or a.startswith(tuple(f + "=" for f in informational)) for a in argv):
        return
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    overrides, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in VALUED or a in PRINTS_CONFIG:  # a flag and its value
            if a in ("--config-name", "-cn") and i + 1 < len(argv):
                config_name = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif not a.startswith("-"):
            overrides.append(a)
        i += 1
    dirs = _config_dirs(argv)
    if dirs:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in dirs) + "]")
    sweeps, overrides = split_sweeps(overrides)
    try:
        with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - any composition error is the user's config: one line
        raise ConfigError(compose_error(e)) from None
    multirun = multirun or str(OmegaConf.select(cfg, "hydra.mode")) in ("MULTIRUN", "RunMode.MULTIRUN")
    if sweeps and not multirun:
        raise ConfigError(f"{sweeps[0].input_line} is a sweep (one job per value): add -m, or use a config that sets "
                          "multirun (hparams_search=...)")  # fmt: skip
    if multirun and "optuna" in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
        check_search_space(cfg, sweeps)
    check_run_name(cfg.get("run_name"))
    check_types(cfg)
    # where Hydra creates the run folder before dgss runs (its OSError would be a traceback)
    try:
        log_dir = OmegaConf.select(cfg, "paths.log_dir")
    except Exception:  # noqa: BLE001 - an interpolation the run itself reports
        log_dir = None
    if log_dir:
        writable_folder(log_dir, "paths.log_dir (DGSS_LOG_DIR)")
    for line in overrides:
        key, _, value = line.partition("=")
        if (
            key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir", "paths.output_dir")
            and value
        ):
            writable_folder(value, key.lstrip("+"))
    method = cfg.get("method")
    node = schema_for(method) if method is not None else None
    if node is None:
        return
    hints = typing.get_type_hints(node)
    for name in method:
        if name not in hints:  # a key added with + (a struct node refuses the others while composing)
            new = renamed(f"method.{name}")
            raise ConfigError(f"method.{name} is now called {new}" if new else f"method.{name} is not an option of "
                              f"{str(method.get('_target_')).rsplit('.', 1)[-1]}; valid: {', '.join(hints)}")  # fmt: skip
    for name, hint in hints.items():
        if isinstance(hint, type) and issubclass(hint, Options):
            hint.of(method.get(name), f"method.{name}")
        elif typing.get_origin(hint) is typing.Literal and method.get(name) not in typing.get_args(hint):
            raise ConfigError(f"method.{name}={method.get(name)!r} is not supported; choose one of "
                              f"{list(typing.get_args(hint))}")  # fmt: skip


MULTIRUN_FLAGS = ("-m", "--multirun")


def split_sweeps(overrides: list[str]) -> tuple[list, list[str]]:
    """(the sweep overrides, parsed: ``lr=interval(1e-5,1e-3)``, ``seed=1,2``; the others as given)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - composing reports the syntax error in one line
        return [], overrides
    sweeps = [o for o in parsed if o.is_sweep_override()]
    return sweeps, [o.input_line for o in parsed if not o.is_sweep_override()]


def check_search_space(cfg: DictConfig, sweeps: list) -> None:
    """Every parameter of an Optuna search space (the config's ``hydra.sweeper.params`` and the command line's
    sweeps) as the sweeper will build it: a reversed interval, an empty choice -> one line naming the key."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + [o.input_line for o in sweeps]
    for line in lines:
        try:
            (override,) = OverridesParser.create().parse_overrides([line])
            optuna_distribution(override)
        except Exception as e:  # noqa: BLE001 - optuna's ValueError, Hydra's grammar error
            raise ConfigError(f"search space {line}: {first_line(e)}") from None


def entry_point(hydra_main: Callable[[], Any], prog: str, config_name: str) -> Callable[[], Any]:
    """A console script: :func:`check_argv` and :func:`check_compose` first (one line and exit 2 on a bad config
    file, choice, key or value), then Hydra."""

    def main() -> Any:
        try:
            check_argv(sys.argv[1:])
            check_compose(config_name, sys.argv[1:])
        except ConfigError as e:
            if os.environ.get("DGSS_DEBUG"):
                raise
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        try:
            result = hydra_main()
        except (
            Exception,
            SystemExit,
        ):  # e.g. Optuna's "no trials completed" when every job failed: they are why
            if not FAILED_JOBS or os.environ.get("DGSS_DEBUG"):
                raise
            result = None
        if FAILED_JOBS:  # a sweep whose every other job ran
            print(f"{prog}: {len(FAILED_JOBS)} sweep job(s) failed: " + "; ".join(FAILED_JOBS[:3])
                  + (f" (+{len(FAILED_JOBS) - 3} more)" if len(FAILED_JOBS) > 3 else ""), file=sys.stderr)  # fmt: skip
            sys.exit(1)
        return result

    main.__doc__ = hydra_main.__doc__
    return main
