"""``dgss-eval ckpt_path=<file>``: rebuild a trained model from its checkpoint and evaluate any targets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dgss.callbacks import IoUTables, SkippedSamples
from dgss.checkpoint import load_checkpoint_dict
from dgss.config import build_method, check_types, entry_point, instantiate_group, run_cli
from dgss.errors import ConfigError

log = logging.getLogger("dgss.eval")


def load_method(ckpt_path: str, backbone_weights: str | None = None, inference: dict | None = None,
                recipe: DictConfig | None = None):  # fmt: skip
    """The trained method of a checkpoint, frozen backbone re-attached; also returns its config.

    A dgss-train checkpoint carries its own config. An official release (an mmengine dict with ``backbone.reins.*``
    and ``decode_head.*``, e.g. a published Rein checkpoint) needs ``recipe``, the config it was trained with
    (``experiment=rein``): the method is built from it and the release's tensors imported.
    """
    path = Path(ckpt_path).expanduser()
    ckpt = load_checkpoint_dict(path, "ckpt_path")
    official = "dgss_config" not in ckpt
    if not official and recipe is not None:
        given = [k for k in ("backbone", "head", "method") if recipe.get(k) is not None]
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a dgss-train checkpoint: it rebuilds its own "
            f"{ckpt['dgss_config']['method']['_target_'].rsplit('.', 1)[-1]} model, so {', '.join(given)} (or the "
            "experiment setting them) would be ignored; drop them (data=, inference=, backbone_weights= still apply)"
        )
    if official:
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        if not any(str(k).startswith(("backbone.reins.", "decode_head.")) for k in state):
            raise ConfigError(
                f"ckpt_path={str(path)!r} is not a dgss-train checkpoint (no 'dgss_config' entry)"
            )
        if recipe is None or recipe.get("method") is None:
            raise ConfigError(f"ckpt_path={str(path)!r} is an official release without a dgss config; add the recipe "
                              "it was trained with, e.g. experiment=rein (and backbone.weights=<converted file>)")  # fmt: skip
        saved = OmegaConf.create(OmegaConf.to_container(recipe, resolve=True))
    else:
        saved = OmegaConf.create(ckpt["dgss_config"])
    if backbone_weights:
        saved.backbone.weights = backbone_weights
    if inference:
        saved.method.inference = OmegaConf.merge(saved.method.get("inference", {}), inference)
    method = build_method(saved)
    if official:
        if not hasattr(method, "load_official"):
            raise ConfigError(
                f"method {type(method).__name__} has no official checkpoint format; use experiment=rein"
            )
        method.load_official(state)
    else:
        method.on_load_checkpoint(ckpt)
        method.load_state_dict(ckpt["state_dict"], strict=method.strict_loading)
    return method, saved


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_types(cfg)
    pl.seed_everything(cfg.get("seed", 0), verbose=False)
    recipe = cfg if cfg.get("method") is not None else None
    method, saved = load_method(cfg.ckpt_path, cfg.get("backbone_weights"), cfg.get("inference"), recipe)
    data_cfg = OmegaConf.create(
        OmegaConf.to_container(cfg.data if cfg.get("data") is not None else saved.data, resolve=True)
    )
    data_cfg.sources = {}  # evaluation reads only the targets: the training images need not be on this machine
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.set_normalization(*method.backbone.normalization)
    out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[IoUTables(out, title="evaluation IoU (%)"), SkippedSamples()],
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    trainer.validate(method, datamodule=datamodule, verbose=False)  # the IoU table says it once
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    metrics = run_cli(evaluate, cfg, "dgss-eval")
    return metrics.get("val/mean_mIoU")


main = entry_point(hydra_main, "dgss-eval")

if __name__ == "__main__":
    main()
