#!/usr/bin/env python
"""Merge a PEFT-only / sparse dgss checkpoint with its frozen backbone into one self-contained checkpoint.

dgss checkpoints of frozen-backbone methods (frozen, rein, lora, adaptformer, vpt, cobot) hold only what trained,
and FisherTune's hold the selected elements as a sparse delta; both re-attach the backbone from its weights file
(checked by sha256). The merged file holds every tensor, so it evaluates (``dgss-eval ckpt_path=<merged>``) and
ships without the weights file; its config records ``backbone.weights: null`` and the provenance of the merge.

    python scripts/merge_weights.py logs/rein/runs/<run>/checkpoints/last.ckpt --out rein_full.ckpt
                                    [--backbone-weights <where the weights file is now>]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def merge(ckpt_path: str | Path, out: str | Path, backbone_weights: str | None = None) -> dict:
    import torch
    from omegaconf import OmegaConf

    from dgss.checkpoint import load_checkpoint_dict
    from dgss.eval import load_method
    from dgss.io import atomic_path

    method, saved = load_method(str(ckpt_path), backbone_weights)
    ckpt = load_checkpoint_dict(ckpt_path)
    identity = method.backbone.identity
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    cfg = OmegaConf.to_container(saved, resolve=True)
    cfg["backbone"]["weights"] = None  # every tensor is in this file now
    ckpt["dgss_config"] = cfg
    ckpt["dgss"] = {**ckpt.get("dgss", {}), "backbone": {**identity, "weights": None, "weights_sha256": None},
                    "merged": {"from": str(ckpt_path), "from_sha256": hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest(),
                               "backbone_weights": identity["weights"], "backbone_sha256": identity["weights_sha256"]}}  # fmt: skip
    for key in ("optimizer_states", "lr_schedulers"):  # a model file, not a training state
        ckpt.pop(key, None)
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return {"tensors": len(ckpt["state_dict"]), **ckpt["dgss"]["merged"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--backbone-weights", default=None, help="the frozen backbone's weights file, if it moved")
    a = p.parse_args(argv)
    from dgss.config import user_error

    try:
        print(merge(a.ckpt, a.out, a.backbone_weights))
    except Exception as e:  # a user's file or option: one line; anything else is a bug (traceback)
        msg = user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
