"""scripts/pretrain_toy.py writes weights that the demo's backbone config loads from a local file."""

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pretrain_toy  # noqa: E402


def test_block_mask_ratio_and_cells():
    m = pretrain_toy.block_mask(3, 6, 12, 0.5, 2, torch.Generator().manual_seed(0))
    assert m.shape == (3, 6, 12) and (m.float().mean((1, 2)) == 0.5).all()
    assert torch.equal(m[:, ::2, ::2], m[:, 1::2, 1::2])  # 2x2 cells


def test_pretrained_file_loads_through_the_backbone_config(compose_cfg, tmp_path, monkeypatch):
    out = tmp_path / "tiny.safetensors"
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["pretrain_toy.py", "--out", str(out), "--steps", "3", "--batch", "2",
                                      "--per-domain", "1", "--threads", "1"])  # fmt: skip
    pretrain_toy.main()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["images"] == 5 and record["steps"] == 3 and not out.with_suffix(".tmp").exists()
    cfg = compose_cfg(["experiment=demo", f"backbone.weights={out}"])
    bb = hydra.utils.instantiate(cfg.backbone)
    saved = load_file(out)
    assert bb.weights == str(out)
    for name, p in bb.model.named_parameters():  # every tensor the demo tunes comes from the file
        assert torch.equal(p.detach(), saved[name]), name
