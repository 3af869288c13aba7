"""``dgss-train``: fit a method on the configured sources, validate on every target."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from dgss.callbacks import StoreConfig
from dgss.checkpoint import (
    check_same_method,
    config_of,
    find_resume_checkpoint,
    identity_of,
    is_training_state,
    read_checkpoint,
    run_settings,
    section,
)
from dgss.cli import entry_point, run_cli
from dgss.compat import quiet_fit
from dgss.config import (
    GENERATED_RUN_FOLDERS,
    build_method,
    check_launch,
    check_types,
    instantiate_group,
    model_config,
    wandb_installed,
)
from dgss.errors import ConfigError
from dgss.preemption import Preemption
from dgss.runfolder import RunLock, check_fresh, check_run_name
from dgss.trust import check_stored_config, command_line_config_dirs

log = logging.getLogger("dgss.train")


def resume_from(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given; with ``resume=auto`` the newest loadable checkpoint of this run's folder."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    resume = cfg.get("resume")
    if resume in (None, False, "never"):
        return None
    if resume != "auto":
        raise ConfigError(f"resume={resume!r}; use resume=auto (or ckpt_path=<file> for a given checkpoint)")
    if set(Path(cfg.paths.output_dir).parts) & GENERATED_RUN_FOLDERS:
        raise ConfigError(
            "resume=auto needs run_name=<name>: without it every run gets a new folder, so there is nothing to "
            "continue; give the run a name on its first start and on every rerun (logs/<task>/runs/<name>)"
        )
    found = find_resume_checkpoint(Path(cfg.paths.output_dir) / "checkpoints")
    log.info(
        f"resume=auto: {'continuing from ' + str(found) if found else 'no checkpoint yet, starting fresh'}"
    )
    return str(found) if found else None


def keep_wandb_run(cfg: DictConfig) -> str | None:
    """One wandb run per run folder: the id is kept in ``<run>/wandb_run_id``, so a resumed run (resume=auto, the
    same ``run_name``, a requeued SLURM job) logs into the run it started, not a new one."""
    wb = OmegaConf.select(cfg, "logger.wandb")
    if wb is not None and not wandb_installed():
        return None  # instantiating the loggers says so in one line; nothing written
    if wb is None or wb.get("id"):
        return wb.get("id") if wb is not None else None
    path = Path(cfg.paths.output_dir) / "wandb_run_id"
    run_id = path.read_text().strip() if path.is_file() else secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    with open_dict(wb):
        wb.id, wb.resume = run_id, "allow"
    return run_id


def steps_to_batches(trainer_cfg: DictConfig) -> dict[str, int]:
    """``trainer.val_check_interval`` counts optimizer steps, like ``max_steps`` and the periodic checkpoints; Lightning
    counts batches, so with gradient accumulation it gets steps × ``accumulate_grad_batches`` (validation and
    checkpoints then fall on the same step boundaries)."""
    acc, every = trainer_cfg.get("accumulate_grad_batches", 1), trainer_cfg.get("val_check_interval")
    return {"val_check_interval": every * acc} if acc > 1 and isinstance(every, int) else {}


def progress_display(callbacks: list, trainer_cfg: DictConfig) -> dict[str, bool]:
    """dgss's step bar (``callbacks.progress_bar``) is the progress display: without it (``~callbacks.progress_bar``)
    there is none, not Lightning's own epoch bar (``Epoch 0/-2`` on an iteration-based run), unless
    ``trainer.enable_progress_bar`` says otherwise."""
    if (
        any(isinstance(c, ProgressBar) for c in callbacks)
        or trainer_cfg.get("enable_progress_bar") is not None
    ):
        return {}
    return {"enable_progress_bar": False}


def check_schedule(trainer_cfg: DictConfig) -> None:
    """Mistakes that would otherwise show only at the end of a whole run."""
    steps, every = trainer_cfg.get("max_steps"), trainer_cfg.get("val_check_interval")
    if (
        isinstance(steps, int)
        and steps > 0
        and isinstance(every, int)
        and not isinstance(every, bool)
        and every > steps
    ):
        raise ConfigError(
            f"trainer.val_check_interval={every} is past trainer.max_steps={steps}: the run would never validate "
            f"nor write its periodic checkpoints; set trainer.val_check_interval <= {steps}"
        )


def check_resume(cfg: DictConfig, path: str) -> int:
    """Read the checkpoint to resume from before anything is built (memory-mapped: cheap): unreadable, unsafe, not
    dgss-train's, a model-only file, another method's, or a run this command would silently change -> one line.
    Returns the step it was saved at."""
    ckpt = read_checkpoint(path, "ckpt_path", mmap=True)
    if "state_dict" not in ckpt or "global_step" not in ckpt:
        raise ConfigError(
            f"ckpt_path={path!r} is not a dgss-train checkpoint (an official release or a plain state dict?): "
            "dgss-train resumes its own runs; evaluate a release with dgss-eval ckpt_path=<file> experiment=rein, "
            "or start from backbone weights with backbone.weights=<file>"
        )
    if (
        config_of(ckpt) is not None
    ):  # never built from here, but a crafted file is refused by every command alike
        check_stored_config(config_of(ckpt), f"ckpt_path={path!r}", command_line_config_dirs())
    if not is_training_state(ckpt):
        raise ConfigError(
            f"ckpt_path={path!r} is a model-only file ({'a dgss-merge output' if 'merged' in identity_of(ckpt) else 'no optimizer or loop state'}): "
            "it evaluates (dgss-eval ckpt_path=<file>) but cannot resume a run; resume from a training checkpoint "
            "(checkpoints/last.ckpt, step*.ckpt, preempted.ckpt)"
        )  # fmt: skip
    check_same_method(ckpt, cfg.method._target_)
    check_unchanged(cfg, ckpt, path)
    return int(ckpt["global_step"])


# what a resumed run takes from the checkpoint, not from the command line: a changed value would be ignored (the
# optimizer and schedule states are restored) or would change the run under the same name
RESUME_FIXED = ("backbone", "head", "method", "data.sources", "data.batch_size", "data.train_pipeline",
                "data.rare_class_sampling", "data.source_subset")  # fmt: skip
RESUME_FREE = (
    "backbone.weights",
    "method.inference",
    "method.max_nonfinite",
    "method.input",  # the data's crop, linked (data.train_pipeline is checked itself); absent before issue 29
)  # may change (checked elsewhere)


def _flat(node, prefix: str) -> dict[str, object]:
    """``{dotted key: leaf value}`` of a (Dict)Config subtree."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node)
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out |= _flat(v, f"{prefix}.{k}")
        return out or {prefix: {}}
    return {prefix: node}


def check_unchanged(cfg: DictConfig, ckpt: dict, path: str) -> None:
    """A resumed run continues the run it resumes, or is refused in one line: the same model, recipe and training
    data (:data:`RESUME_FIXED`), the same ``trainer.max_steps`` (the schedule decays to 0 there; a raised one
    would train every added step at learning rate 0, a lowered one stop mid-decay) and gradient accumulation, and
    weight averaging as it was (the checkpoint's ``state_dict`` holds the averages)."""
    stored, now = config_of(ckpt) or {}, model_config(cfg)
    changed = []
    for key in RESUME_FIXED:
        if key.split(".")[0] not in stored:
            continue
        fa, fb = (_flat(OmegaConf.select(OmegaConf.create(c), key, default=None), key) for c in (stored, now))
        for k in sorted(set(fa) | set(fb)):
            if not k.startswith(RESUME_FREE) and fa.get(k) != fb.get(k):
                changed.append(f"{k}={fa.get(k)!r} (this command: {fb.get(k)!r})")
    run = run_settings(ckpt)
    for key in ("max_steps", "accumulate_grad_batches"):
        if key in run and cfg.trainer.get(key, 1) != run[key]:
            changed.append(f"trainer.{key}={run[key]} (this command: {cfg.trainer.get(key)})")
    if changed and "max_steps" in changed[0] and len(changed) == 1:
        raise ConfigError(
            f"ckpt_path={path!r} belongs to a run of trainer.max_steps={run['max_steps']}, whose learning rate decays "
            f"to 0 at that step; resuming it with trainer.max_steps={cfg.trainer.get('max_steps')} would "
            f"{'train every added step at learning rate 0' if cfg.trainer.get('max_steps', -1) > run['max_steps'] or cfg.trainer.get('max_steps', -1) < 0 else 'stop before the schedule ends'}: "
            f"resume with trainer.max_steps={run['max_steps']}, or train a new run (another run_name) for longer"
        )  # fmt: skip
    if changed:
        raise ConfigError(
            f"ckpt_path={path!r} was trained with {'; '.join(changed[:3])}{f' (+{len(changed) - 3} more)' if len(changed) > 3 else ''}: "
            "a resumed run continues with the checkpoint's optimizer and schedule, so the new value would be ignored "
            "or change the run under the same name; resume with the values it was trained with, or train a new run "
            "(another run_name) with the new ones"
        )  # fmt: skip
    wa, ema = section(ckpt, "weight_averaging"), OmegaConf.select(cfg, "callbacks.ema")
    if wa and (
        ema is None
        or (float(ema.get("momentum", 2e-4)), int(ema.get("begin", 0)))
        != (float(wa["momentum"]), int(wa["begin"]))
    ):
        was = f"{{_target_: dgss.callbacks.EMA, momentum: {wa['momentum']}, begin: {wa['begin']}}}"
        raise ConfigError(
            f"ckpt_path={path!r} was trained with weight averaging (callbacks.ema={was}) and its state_dict holds the "
            f"averages; {'without it' if ema is None else 'with other settings'} the run would go on from the wrong weights: resume "
            f"with callbacks.ema='{was}' (or the experiment that set it)"
        )  # fmt: skip


def finished_metrics(output_dir: str | Path) -> dict[str, float]:
    """The last validation of a finished run (its ``metrics.json``), as ``val/...`` floats."""
    path = Path(output_dir) / "metrics.json"
    try:
        last = [e for e in json.loads(path.read_text()) if e.get("stage") == "val"][-1]
    except (OSError, ValueError, IndexError):
        return {}
    out = {f"val/{d}/mIoU": float(v["mIoU"]) for d, v in last["domains"].items()}
    return {**out, "val/mean_mIoU": float(last["mean_mIoU"])}


def resume_hint(cfg: DictConfig) -> str:
    """What to add to the same command to continue this run after a stop: its folder's name when Hydra made it up
    (a new run would get a new folder), and resume=auto unless given."""
    made_up = sorted(set(Path(cfg.paths.output_dir).parts) & GENERATED_RUN_FOLDERS)
    return " ".join(
        [*(f"run_name={n}" for n in made_up[:1]), *([] if cfg.get("resume") == "auto" else ["resume=auto"])]
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg`` and fit; returns the final callback metrics as floats. The run folder is
    locked meanwhile (one run per folder, :mod:`dgss.runfolder`)."""
    check_types(cfg)
    check_schedule(cfg.trainer)
    check_run_name(cfg.get("run_name"))
    with RunLock(cfg.paths.output_dir, enabled=rank_zero_only.rank == 0):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    ckpt_path = resume_from(cfg)
    if rank_zero_only.rank == 0:
        check_fresh(
            cfg.paths.output_dir, bool(cfg.get("overwrite")), bool(ckpt_path) or cfg.get("resume") == "auto"
        )
    if ckpt_path:
        step, max_steps = check_resume(cfg, ckpt_path), cfg.trainer.get("max_steps", -1)
        if max_steps and max_steps > 0 and step >= max_steps:
            log.info(f"the run already finished: {ckpt_path} is at step {step} of trainer.max_steps={max_steps}; "
                     "nothing to train (to train longer, start a new run with another run_name: the schedule of this "
                     "one ended at 0)")  # fmt: skip
            return finished_metrics(cfg.paths.output_dir)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        check_launch(cfg.trainer, hc.mode, OmegaConf.select(hc, "launcher._target_"))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = build_method(cfg, restoring=bool(ckpt_path))
    if cfg.get("compile"):
        model.compile_regions()  # blocks and head compiled in place: parameter names (checkpoint keys) unchanged
    callbacks = [*instantiate_group(cfg.get("callbacks")), StoreConfig(model_config(cfg))]
    for cb in callbacks:
        if isinstance(cb, Preemption):
            cb.resume_hint = resume_hint(cfg)
            if cb.resume_hint:  # a requeued job runs the same command: without these it would start over
                cb.requeue_refused = (
                    f"the command lacks {cb.resume_hint}, so the requeued job would start over"
                )
    keep_wandb_run(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        log.info("no logger configured: LearningRateMonitor dropped (it only writes to loggers)")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                  **steps_to_batches(cfg.trainer), **progress_display(callbacks, cfg.trainer))  # fmt: skip
    if trainer.world_size > 1 and cfg.trainer.get("use_distributed_sampler", True):
        raise ConfigError(
            "trainer.use_distributed_sampler must be false: the DataModule's samplers are DDP-exact"
        )
    for lg in loggers:
        lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), "seed": cfg.get("seed")})
    with quiet_fit():  # Lightning warnings that are false for dgss (dgss.compat.FALSE_WARNINGS)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        log.info(f"best checkpoint: {ckpt.best_model_path}")
    return metrics


def _main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    log.info(f"run dir: {HydraConfig.get().runtime.output_dir}")
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        if (
            cfg.trainer.get("fast_dev_run") or not metrics
        ):  # a debug run, or a finished run with nothing on record
            return None
        raise ConfigError(
            f"optimized_metric={name!r} was never logged; logged metrics: {', '.join(sorted(metrics))}"
        )
    return metrics[name]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    return run_cli(_main, cfg, "dgss-train")


main = entry_point(hydra_main, "dgss-train", "train")

if __name__ == "__main__":
    main()
