"""``dgss-merge <ckpt> --out <file> [--backbone-weights <file>]``: one self-contained checkpoint from a frozen-backbone
or sparse (FisherTune) dgss checkpoint and its weights file (``dgss.restore.merge``).

dgss checkpoints of frozen-backbone methods (frozen, rein, lora, adaptformer, vpt, cobot) hold only what trained, and
FisherTune's hold the selected elements as a sparse delta; both re-attach the backbone from its weights file (checked
by sha256). The merged file holds every tensor, so it evaluates (``dgss-eval ckpt_path=<merged>``) and ships without
the weights file; its config records ``backbone.weights: null`` and the provenance of the merge.
"""

from __future__ import annotations

import argparse
import json
import sys

from dgss.cli import user_error
from dgss.restore import merge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dgss-merge", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a dgss-train checkpoint")
    p.add_argument("--out", default=None, help="the merged checkpoint to write (atomically)")
    p.add_argument("--backbone-out", default=None, help="also write the plain backbone with the method folded into its "
                   "weights (.safetensors; SoMA, or methods that train the backbone itself)")  # fmt: skip
    p.add_argument("--backbone-weights", default=None, help="the frozen backbone's weights file, if it moved")
    p.add_argument("--config-dir", action="append", default=[], help="a config folder naming your own classes (a "
                   "checkpoint's config may only name classes of dgss's config tree and of these folders)")  # fmt: skip
    a = p.parse_args(argv)
    if a.out is None and a.backbone_out is None:
        p.error("give --out (a merged checkpoint), --backbone-out (a plain backbone), or both")
    try:
        print(json.dumps(merge(a.ckpt, a.out, a.backbone_weights, a.backbone_out, a.config_dir)))
    except Exception as e:  # a user's file or option: one line; anything else is a bug (traceback)
        msg = user_error(e)
        if msg is None:
            raise
        print(f"dgss-merge: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
