"""Shared checks of the methods whose adapters start from a decomposition of the frozen weights (SoMA, RecycleLoRA)."""

import pytest
import torch

from dgss.eval import evaluate
from dgss.models.backbone import Backbone
from dgss.restore import load_method, merge


def assert_restores_and_folds(compose_cfg, ckpt_path, metrics: dict, tmp_path, height: int, width: int):
    """``dgss-eval`` of ``ckpt_path`` reproduces the run's ``metrics`` (the caller has made the decomposition raise,
    so nothing is re-decomposed), and ``dgss-merge --backbone-out`` writes a plain timm backbone whose features
    equal the adapted backbone's. Returns the method loaded from the checkpoint."""
    again = evaluate(compose_cfg([f"ckpt_path={ckpt_path}", "trainer=cpu"], config_name="eval"))
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/fog/mIoU"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-9), k
    plain = tmp_path / "plain.safetensors"
    assert merge(ckpt_path, None, backbone_out=plain) == {"backbone_out": str(plain)}
    method, saved = load_method(ckpt_path)
    adapted = method.backbone.eval()
    kw = {k: v for k, v in saved.backbone.items() if k not in ("_target_", "weights")}
    flat = Backbone(**{**kw, "weights": str(plain)}).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        for a, b in zip(adapted(x), flat(x)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    return method
