"""``dgss-export ckpt_path=<file> [format=onnx|pt2] [input_size=[h, w]] [dynamic_size=true]``: the inference graph of
a trained model as one file a deployment runtime loads (ONNX for onnxruntime / TensorRT, or a ``torch.export``
program).

The graph (:class:`InferenceGraph`) takes uint8 RGB images (B, 3, H, W) and returns per-class scores (B, K, H, W) at
the input size: the model's normalisation, the bottom / right padding to the patch multiple, the backbone, the head and
the head's scores cropped back — :meth:`SegmentationMethod.predict_logits` with ``inference.mode: whole`` and no
test-time augmentation, which the export checks the file against (``check: true``). Sliding windows, flips and
multiple scales stay outside the graph: a deployment cuts windows and averages them as
:func:`dgss.models.inference.slide` does (docs/export.md).

Methods whose modules fold into the backbone's weights are exported folded (full, frozen, FisherTune: the timm model
itself; LoRA, SoMA, RecycleLoRA: W' = W + s·B·A), so the graph is the plain backbone's; Rein, VPT, AdaptFormer and
SAM-COBOT keep their modules (``fold: false`` keeps every method's). dgss's deformable attention is ``grid_sample``
(ONNX GridSample, opset ≥ 16), so Mask2Former exports where mmcv's CUDA op could not. Attention is written out
(timm's ``fused_attn`` off while exporting: SAM's relative-position attention has no fused ONNX form).

The batch axis is dynamic; height and width are fixed (``input_size``, by default the checkpoint's test size as
height × width of a landscape frame) or free with ``dynamic_size: true`` (any size: the graph pads to the patch
multiple itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dgss import hub
from dgss.cli import entry_point, run_cli
from dgss.compat import optional_module
from dgss.data.classes import ClassSet
from dgss.errors import ConfigError
from dgss.io import atomic_path, check_output_folder
from dgss.options import Options
from dgss.restore import load_method

log = logging.getLogger("dgss.export")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}


@dataclass
class ExportOptions(Options):
    """The options of ``dgss-export`` (conf/export.yaml)."""

    format: Literal["onnx", "pt2"] = "onnx"  # ONNX (onnxruntime, TensorRT) or a torch.export program (.pt2)
    input_size: list[int] | None = None  # [height, width]; null: the checkpoint's test size, landscape
    dynamic_size: bool = False  # height and width free (the graph pads to the patch multiple itself)
    opset: int = 18  # ONNX opset (>= 16: GridSample)
    fold: bool = True  # fold adapters into the backbone's weights where the method's modules allow
    check: bool = True  # run the written file on a random batch and compare with predict_logits
    # the largest difference the check accepts, in units of the largest score magnitude (at least 1): logits are O(1),
    # Mask2Former's scores sum over queries (O(10)), where float32 itself differs from float64 by ~1e-4
    tolerance: float = 1.0e-4
    batch: int = 2  # the example batch the graph is traced with (the batch axis stays dynamic)


class InferenceGraph(nn.Module):
    """uint8 RGB (B, 3, H, W) → scores (B, K, H, W): the method's normalisation, padding to the patch multiple,
    forward, the head's scores at the padded size cropped to the input (``inference.whole`` with ``out_size`` the
    input size)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.method
        x = m.normalize(images)
        h, w = x.shape[-2:]
        p = m.backbone.patch_size
        # always padded (by 0 rows where h is a multiple): a branch on the size would be fixed at tracing time
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        return m.head.logits(m(x), x.shape[-2:])[..., :h, :w]


@contextlib.contextmanager
def written_out_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention modules take the explicit softmax(q·kᵀ)·v path (``fused_attn = False``) inside the block,
    restored after: the same function, in operators every exporter has."""
    fused = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    before = [m.fused_attn for m in fused]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, b in zip(fused, before):
            m.fused_attn = b


def fold_for_export(method) -> bool:
    """Replace the method's backbone model by its plain form (adapters folded) where the method has one; True if
    it did. A method whose modules do not fold says so with a ConfigError (:meth:`plain_backbone`): kept as is."""
    try:
        plain = method.plain_backbone()
    except ConfigError:
        return False
    method.backbone.model = plain.eval()
    return True


def default_input_size(data: dict) -> list[int]:
    """[height, width] of a landscape frame at the checkpoint's test size (its first target's, as dgss-eval and
    dgss-predict use), else its training crop."""
    targets = dict(data.get("targets") or {})
    first = next(iter(targets.values()), None) or {}
    size = first.get("test_size") or (data.get("test_pipeline") or {}).get("size")
    if size:
        long, short = int(size[0]), int(size[1])
        return [min(long, short), max(long, short)]
    crop = (data.get("train_pipeline") or {}).get("crop")
    if crop:
        return [int(crop[0]), int(crop[1])]
    raise ConfigError("the checkpoint names no test size or crop; give input_size=[height, width]")


def export_graph(graph: InferenceGraph, example: torch.Tensor, path: Path, o: ExportOptions) -> None:
    """Trace ``graph`` on ``example`` with torch.export (batch dynamic; height / width with ``dynamic_size``) and
    write it to ``path`` (atomically) as ONNX or a .pt2 program."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims = {0: batch}
    if o.dynamic_size:
        # free, with the guards tracing finds kept as the graph's own checks
        dims |= {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    with written_out_attention(graph), atomic_path(path) as tmp, torch.no_grad():
        if o.format == "onnx":
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=o.opset,
                                        dynamic_shapes={"images": dims}, input_names=["images"],
                                        output_names=["scores"], verbose=False)  # fmt: skip
            program.save(str(tmp))
        else:
            ep = torch.export.export(graph, (example,), dynamic_shapes={"images": dims})
            torch.export.save(ep, str(tmp))


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """The written file's scores for ``images`` (onnxruntime on the CPU, or the loaded .pt2 program)."""
    if fmt == "onnx":
        ort = optional_module(
            "onnxruntime",
            "check=true runs the file in onnxruntime: pip install 'dgss[export]' (or check=false)",
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        return torch.export.load(str(path)).module()(images)


def check_exported(method, path: Path, o: ExportOptions, size: list[int]) -> tuple[float, float]:
    """The largest absolute difference between the file's scores and ``method.predict_logits`` (whole image, no
    TTA) on a random batch of another batch size (and, with ``dynamic_size``, another input size), and the scores'
    scale (their largest magnitude, at least 1)."""
    h, w = size
    if o.dynamic_size:
        p = method.backbone.patch_size
        h, w = (
            h + p // 2 + 1,
            w - p // 2 - 1,
        )  # not multiples of the patch: the graph's own padding is checked too
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (o.batch + 1, 3, h, w), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        want = method.predict_logits(images, (h, w))
    got = run_exported(path, o.format, images)
    if got.shape != want.shape:
        raise RuntimeError(
            f"the exported graph gives scores of shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}"
        )
    return float((got - want).abs().max()), max(float(want.abs().max()), 1.0)


def export_method(method, out: Path, o: ExportOptions, size: list[int]) -> dict:
    """Write ``method``'s inference graph for images of ``size`` ([height, width]) to ``out/model.<format>``,
    folded where it folds (``o.fold``), and check it (``o.check``); returns what was written and measured."""
    method = method.float().eval()
    folded = fold_for_export(method) if o.fold else False
    path = out / f"model{SUFFIX[o.format]}"
    g = torch.Generator().manual_seed(0)
    shape = list(size)
    if o.dynamic_size:  # traced at a size that needs padding, so no branch is fixed at "nothing to pad"
        p = method.backbone.patch_size
        shape = [v + 1 if (v + 1) % p else v + 2 for v in size]
    example = torch.randint(0, 256, (o.batch, 3, *shape), dtype=torch.uint8, generator=g)
    log.info(f"dgss-export: {type(method).__name__} ({'folded into' if folded else 'modules kept in'} the backbone), "
             f"input {'any size' if o.dynamic_size else f'{size[0]}×{size[1]}'}, to {path}")  # fmt: skip
    export_graph(InferenceGraph(method).eval(), example, path, o)
    result = {"file": str(path), "format": o.format, "folded": folded, "input_size": size}
    if o.check:
        diff, scale = check_exported(method, path, o, size)
        result |= {"max_abs_difference": diff, "score_scale": scale}
        if not diff <= o.tolerance * scale:
            raise RuntimeError(f"the exported graph differs from PyTorch by {diff:.3g} (> tolerance={o.tolerance} × "
                               f"the scores' scale {scale:.3g})")  # fmt: skip
        log.info(
            f"dgss-export: the file's scores equal predict_logits within {diff:.2g} (scores up to {scale:.3g})"
        )
    return result


def export(cfg: DictConfig) -> dict:
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines are the exporter's working notes
        logging.getLogger(name).setLevel(logging.WARNING)
    o = ExportOptions.of(
        {k: cfg.get(k) for k in ExportOptions.__dataclass_fields__ if k in cfg}, "dgss-export"
    )
    if o.format == "onnx" and importlib.util.find_spec("onnxscript") is None:
        raise ConfigError("format=onnx needs torch's ONNX exporter (onnxscript): pip install 'dgss[export]'")
    if o.format == "onnx" and o.opset < 16:
        raise ConfigError(
            f"opset={o.opset}: Mask2Former's deformable attention needs GridSample (opset >= 16)"
        )
    if o.input_size is not None and (len(o.input_size) != 2 or min(o.input_size) < 1):
        raise ConfigError(f"input_size={o.input_size}: give [height, width] in pixels")
    out = check_output_folder(cfg.output, "output", {})
    whole = {"mode": "whole", "flip": False, "scales": [1.0]}  # what the graph computes
    method, saved = load_method(cfg.ckpt_path, cfg.get("backbone_weights"), whole)
    data = OmegaConf.to_container(saved.get("data") or OmegaConf.create({}), resolve=True)
    size = list(o.input_size) if o.input_size is not None else default_input_size(data)
    result = export_method(method, out, o, size)
    classes = ClassSet.build(data.get("num_classes"), data.get("class_names"), data.get("palette"))
    ckpt = hub.resolve(cfg.ckpt_path)  # (the cached file of an hf:// release)
    card = {**result, "options": asdict(o), "checkpoint": str(ckpt),
            "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
            "method": type(method).__name__, "backbone": method.backbone.identity.get("name"),
            "input": "uint8 RGB, (batch, 3, height, width); normalisation and padding are inside the graph",
            "output": "scores (batch, classes, height, width): argmax over classes = trainIds",
            "class_names": list(classes.names), "palette": [list(c) for c in classes.palette],
            "torch": torch.__version__}  # fmt: skip
    with atomic_path(out / "model.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    result = run_cli(export, cfg, "dgss-export")
    if result is not None:
        print(json.dumps(result))


main = entry_point(hydra_main, "dgss-export", "export")

if __name__ == "__main__":
    main()
