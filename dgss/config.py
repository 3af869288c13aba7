"""Config plumbing shared by the entry points and tests: resolvers, builders, one-line errors."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import secrets
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from dgss.errors import ConfigError, TrainingAborted
from dgss.preemption import Preempted

OmegaConf.register_new_resolver("int_mul", lambda x, f: int(round(float(x) * float(f))), replace=True)
# a step count as a fraction of another, at least 1: schedules that scale with trainer.max_steps
OmegaConf.register_new_resolver("steps", lambda x, f: max(1, int(round(float(x) * float(f)))), replace=True)

GENERATED_RUN_FOLDERS: set[str] = set()  # folder names run_folder() made up in this process


def run_folder(run_name: str | None) -> str:
    """The run folder's name: ``run_name``, else ``<date>_<time>_<6 hex digits>``, new for every run. The random part
    keeps runs that start in the same second apart (a sweep, an array job); Hydra caches the value per config and
    copies the cache into every sweep job's config, so one run sees one name."""
    if run_name not in (None, ""):
        return str(run_name)
    name = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    GENERATED_RUN_FOLDERS.add(name)
    return name


OmegaConf.register_new_resolver("run_folder", run_folder, use_cache=True, replace=True)

MODEL_KEYS = ("backbone", "head", "method")

# keys users override most, with the type they must have (``None`` allowed where the config allows it)
TYPED_KEYS: dict[str, tuple[type, ...]] = {
    "seed": (int,), "trainer.max_steps": (int,), "trainer.val_check_interval": (int, float),
    "trainer.devices": (int, str, ListConfig), "trainer.num_nodes": (int,), "trainer.log_every_n_steps": (int,),
    "trainer.accumulate_grad_batches": (int,), "data.batch_size": (int,), "data.val_batch_size": (int,),
    "data.num_workers": (int,), "method.optimizer.lr": (int, float), "method.optimizer.weight_decay": (int, float),
    "method.scheduler.warmup_steps": (int,), "method.scheduler.power": (int, float), "head.channels": (int,),
    "synthetic.height": (int,), "synthetic.width": (int,), "synthetic.train_length": (int,), "synthetic.val_length": (int,),
}  # fmt: skip


def check_types(cfg: DictConfig) -> None:
    """One line naming the key for a value of the wrong type (``trainer.max_steps=abc``)."""
    for key, types in TYPED_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{key}={value!r} must be {want}")


def check_launch(trainer_cfg, mode, launcher: str | None) -> None:
    """Refuse multi-process DDP inside an in-process multirun: Lightning would re-launch the whole script once per
    rank for every sweep point. Sweeps with DDP go through a launcher that starts one job per point (SLURM)."""
    if mode is None or getattr(mode, "name", str(mode)) != "MULTIRUN" or "submitit" in str(launcher or ""):
        return
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    many = (isinstance(devices, int) and devices > 1) or (
        isinstance(devices, (list, tuple)) and len(devices) > 1
    )
    many = many or devices == -1 or int(nodes) > 1
    if many:
        raise ConfigError(
            f"trainer.devices={devices}, trainer.num_nodes={nodes} inside an in-process multirun (-m with the basic "
            "launcher): DDP would re-launch the script per rank for every sweep point; use hydra/launcher=slurm (one "
            "job per point, see docs/cluster.md) or run the points one at a time"
        )


def build_method(cfg: DictConfig):
    """backbone + head factory -> the method LightningModule (``cfg.method``)."""
    backbone = hydra.utils.instantiate(cfg.backbone)
    head = hydra.utils.instantiate(cfg.head)
    return hydra.utils.instantiate(cfg.method, backbone=backbone, head=head, _convert_="partial")


def wandb_installed() -> bool:
    """wandb is optional: dgss imports it only where a WandbLogger is configured."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every entry with a ``_target_`` in a callbacks / logger group."""
    if not group:
        return []
    entries = {k: v for k, v in group.items() if isinstance(v, DictConfig) and "_target_" in v}
    for key, v in entries.items():
        if str(v._target_).endswith("WandbLogger") and not wandb_installed():
            raise ConfigError(
                f"logger.{key} needs the wandb package, which is not installed: pip install wandb, or log with "
                "logger=csv or logger=tensorboard"
            )
    return [hydra.utils.instantiate(v) for v in entries.values()]


def model_config(cfg: DictConfig) -> dict:
    """The resolved part of the config that rebuilds the trained model (stored in checkpoints)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in (*MODEL_KEYS, "data") if k in cfg}


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
