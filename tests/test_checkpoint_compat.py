"""Checkpoints written before issue 29's format (no ``format_version``; FisherTune's delta and EMA's raw weights as
top-level keys) still evaluate to the metrics their training run measured. The files in ``tests/data/checkpoint_v0``
were written by commit 4f86b1a (``make_checkpoints.py`` beside them): a frozen-backbone run (the backbone's tensors
left out, re-attached from the weights file by sha256) and a FisherTune run with EMA (a sparse delta)."""

import json
from pathlib import Path

import pytest

from dgss.eval import evaluate

V0 = Path(__file__).parent / "data" / "checkpoint_v0"
EXPECTED = json.loads((V0 / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["frozen", "fishertune_ema"])
def test_a_checkpoint_of_the_previous_format_evaluates_to_its_training_metrics(compose_cfg, name):
    cfg = compose_cfg([f"ckpt_path={V0 / f'{name}.ckpt'}", f"backbone_weights={V0 / 'tiny_dinov2.pth'}",
                       "trainer=cpu"], config_name="eval")  # fmt: skip
    out = evaluate(cfg)
    for key, value in EXPECTED[name].items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
