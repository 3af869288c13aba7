"""Config plumbing shared by the entry points and tests: resolvers, builders, one-line errors."""

from __future__ import annotations

import importlib.util
import secrets
from datetime import datetime
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

import dgss.commands  # noqa: F401  (registers the commands' root schemas)
import dgss.data.datamodule  # noqa: F401  (registers the data schema)
import dgss.data.synthetic  # noqa: F401  (registers data=synthetic's block)
import dgss.methods  # noqa: F401  (registers the methods' schemas)
import dgss.models.backbone  # noqa: F401  (registers the backbone's schema)
import dgss.models.heads.light  # noqa: F401  (registers the heads' schemas)
import dgss.models.heads.mask2former  # noqa: F401
from dgss.data.folder import folder_classes
from dgss.errors import ConfigError
from dgss.runfolder import check_run_name
from dgss.schemas import check_node, register_signature

OmegaConf.register_new_resolver("int_mul", lambda x, f: int(round(float(x) * float(f))), replace=True)
# a step count as a fraction of another, at least 1: schedules that scale with trainer.max_steps
OmegaConf.register_new_resolver(
    "folder_classes", folder_classes, replace=True
)  # data=folder: from classes.yaml
OmegaConf.register_new_resolver("steps", lambda x, f: max(1, int(round(float(x) * float(f)))), replace=True)
# a config choice as a name: experiment/_paper.yaml's task_name (gta2cbm/lora_dinov2_l -> gta2cbm_lora_dinov2_l)
OmegaConf.register_new_resolver("slug", lambda choice: str(choice).replace("/", "_"), replace=True)
# the setting of an experiment/<setting>/<name> choice (its first tag)
OmegaConf.register_new_resolver("setting", lambda choice: str(choice).split("/")[0], replace=True)

GENERATED_RUN_FOLDERS: set[str] = set()  # folder names run_folder() made up in this process


def run_folder(run_name: str | None) -> str:
    """The run folder's name: ``run_name``, else ``<date>_<time>_<6 hex digits>``, new for every run. The random part
    keeps runs that start in the same second apart (a sweep, an array job); Hydra caches the value per config and
    copies the cache into every sweep job's config, so one run sees one name."""
    if run_name not in (None, ""):
        check_run_name(run_name)  # (dgss-train checks it in one line before this; a sweep's value lands here)
        return str(run_name)
    name = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    GENERATED_RUN_FOLDERS.add(name)
    return name


OmegaConf.register_new_resolver("run_folder", run_folder, use_cache=True, replace=True)

MODEL_KEYS = ("backbone", "head", "method")

# trainer=<name>: Lightning's Trainer, typed by its own signature (its unions and Literal choices checked after
# composing); the entry points supply its loggers and callbacks
register_signature(
    pl.Trainer,
    "trainer",
    "trainer_schema",
    supplied=("logger", "callbacks"),
    target="lightning.pytorch.Trainer",
)

#: the config sections typed by their constructors' signatures (dgss.schemas); the method's by its options
SIGNATURE_SECTIONS = ("backbone", "head", "data", "trainer")

# keys whose values have a range, with it in words (a zero stride loops forever, a negative worker count or
# learning rate fails deep inside PyTorch)
RANGES: dict[str, tuple[Any, str]] = {
    "trainer.val_check_interval": (lambda v: v > 0, "> 0"), "trainer.accumulate_grad_batches": (lambda v: v >= 1, ">= 1"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, ">= 1"), "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.val_batch_size": (lambda v: v >= 1, ">= 1"), "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "head.channels": (lambda v: v >= 1, ">= 1"), "method.optimizer.lr": (lambda v: v >= 0, ">= 0"),
    "method.optimizer.weight_decay": (lambda v: v >= 0, ">= 0"), "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "fps": (lambda v: v > 0, "> 0"), "batch": (lambda v: v >= 1, ">= 1"),
}  # fmt: skip


def check_types(cfg: DictConfig) -> None:
    """One line naming the key for a value the schemas' own check cannot see (a union such as
    ``trainer.val_check_interval``, a ``Literal`` such as ``trainer.precision``, a key added with ``+``) or a value out
    of its range (``data.num_workers=-1``, ``alpha=2``). The commands' own keys are typed by their schemas
    (dgss.commands)."""
    for section in SIGNATURE_SECTIONS:
        if isinstance(cfg.get(section), DictConfig):
            check_node(cfg[section], section)
    for key, (ok, words) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise ConfigError(f"{key}={value!r} must be {words}")


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


def build_method(cfg: DictConfig, restoring: bool = False):
    """backbone + head factory -> the method LightningModule (``cfg.method``), its tuning built. ``restoring``: its
    trained state will come from a checkpoint, so no data-dependent initialisation runs (SoMA's SVD)."""
    backbone = hydra.utils.instantiate(cfg.backbone)
    head = hydra.utils.instantiate(cfg.head)
    method = hydra.utils.instantiate(cfg.method, backbone=backbone, head=head, _convert_="partial")
    method.restoring = restoring
    method.configure_model()
    return method


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
