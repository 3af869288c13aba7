import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"


import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from helpers.runs import TINY_DINO  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import dgss.config  # noqa: E402,F401  (registers resolvers)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose(config_name, overrides) with outputs under tmp_path and HydraConfig set."""

    def _compose(overrides=(), config_name="train"):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
            cfg = compose(
                config_name, overrides=[*overrides, f"paths.log_dir={tmp_path}"], return_hydra_config=True
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def weights(tmp_path):
    """A tiny DINOv2 (helpers.runs.TINY_DINO) saved as the backbone's weights file."""
    m = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=64, **TINY_DINO)
    path = tmp_path / "dino_tiny.pth"
    torch.save(m.state_dict(), path)
    return path
