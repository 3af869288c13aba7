"""``dgss-eval ckpt_path=<file>``: rebuild a trained model from its checkpoint (``dgss.restore.load_method``) and
evaluate any targets."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dgss.callbacks import IoUTables, SkippedSamples
from dgss.cli import entry_point, run_cli
from dgss.compat import quiet_fit
from dgss.config import check_types, instantiate_group
from dgss.restore import load_method

log = logging.getLogger("dgss.eval")


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
    out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[IoUTables(out, title="evaluation IoU (%)"), SkippedSamples()],
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    # the Lightning warnings dgss-train's fit filters are false here too (dgss.compat.FALSE_WARNINGS)
    with quiet_fit():
        trainer.validate(method, datamodule=datamodule, verbose=False)  # the IoU table says it once
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    metrics = run_cli(evaluate, cfg, "dgss-eval")
    return metrics.get("val/mean_mIoU")


main = entry_point(hydra_main, "dgss-eval", "eval")

if __name__ == "__main__":
    main()
