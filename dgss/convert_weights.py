"""Convert an official backbone release into the timm-format safetensors file that ``backbone.weights`` loads.

    dgss-convert-weights dinov2 dinov2_vitl14_pretrain.pth --out weights/vit_large_patch14_dinov2.lvd142m.safetensors
    dgss-convert-weights eva02  eva02_L_pt_m38m_p14to16.pt  --out weights/eva02_large_patch14_224.mim_m38m.safetensors
    dgss-convert-weights sam    sam_vit_h_4b8939.pth        --out weights/samvit_huge_patch16.sa1b.safetensors
    dgss-convert-weights clip   ViT-L-14.pt                 --out weights/vit_large_patch14_clip_224.openai.safetensors
    dgss-convert-weights dinov3 dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth --out weights/vit_large_patch16_dinov3.lvd1689m.safetensors

Defaults follow Rein's 512 recipe: patch 16, a 512 image (a 32×32 grid). ``--resample``:

- ``bicubic`` (default, Rein-faithful: ``w1oves/Rein`` ``tools/convert_models``): the patch kernel interpolated to the new patch size and the
  position grid to the new grid with plain bicubic (align_corners=False, no antialias, no rescaling), applied to the
  official tensors before anything else. Published Rein checkpoints were trained on weights converted this way.
- ``pi``: timm's own resampling (FlexiViT pseudo-inverse kernel, antialiased grid), as ``backbone.weights`` would do
  on load.
- ``none``: keep the release's patch size and grid (the model is built with them).

Key names are mapped by timm's own checkpoint filter of the family (Meta DINOv2 and DINOv3, EVA02, SAM
``image_encoder.``, OpenAI CLIP TorchScript archives), then the result is checked strictly against the target timm model and written
atomically with its provenance (source sha256, resample mode) in the file's metadata. SAM's relative-position tables
are fitted to the new grid with the linear interpolation SAM itself applies at run time.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgss.errors import ConfigError, state_mismatch
from dgss.io import UnreadableFile, atomic_path, check_output_file, unreadable_reason
from dgss.io import check_archive as check_zip
from dgss.models.weights import dropped_dinov3_biases, timm_filter

FAMILIES = {  # family -> (default timm model, native patch size)
    "dinov2": ("vit_large_patch14_dinov2.lvd142m", 14),
    "eva02": ("eva02_large_patch14_224.mim_m38m", 14),
    "sam": ("samvit_huge_patch16.sa1b", 16),
    "clip": ("vit_large_patch14_clip_224.openai", 14),
    "dinov3": ("vit_large_patch16_dinov3.lvd1689m", 16),  # Meta's .pth: RoPE, no position table to resample
}
KERNELS = ("patch_embed.proj.weight", "image_encoder.patch_embed.proj.weight", "visual.conv1.weight")
POSITIONS = ("pos_embed", "image_encoder.pos_embed", "visual.positional_embedding")


class ConvertError(Exception):
    """A problem with the input file or the options; printed as one line."""


def read_release(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an official file: a state dict (possibly under model / module / state_dict), or a TorchScript
    archive (OpenAI CLIP)."""

    def check_archive(p: Path, where: str) -> None:
        try:
            check_zip(p, where)
        except UnreadableFile as e:
            raise ConvertError(str(e)) from None

    if path.exists() and not path.is_file():
        raise ConvertError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}; point at the "
                           "official release file")  # fmt: skip
    if not path.is_file():
        raise ConvertError(f"{path} does not exist; download the official release first")
    if path.stat().st_size == 0:
        raise ConvertError(f"{path} is empty (0 bytes): an interrupted download? download it again")
    check_archive(path, str(path))  # (a crafted zip would make torch.load allocate its declared size)
    if is_safetensors(path):  # whatever its name says (a .pth renamed from .safetensors)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{path} is a damaged safetensors file ({e}); download it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - TorchScript archives (OpenAI CLIP) are not plain pickles
        reason = unreadable_reason(e)
        if reason.startswith("holds Python objects"):  # a pickle that would run code: never try further
            raise ConvertError(f"{path} {reason}") from None
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001
            raise ConvertError(
                f"{path} is neither a PyTorch state dict nor a TorchScript archive ({reason})"
            ) from None
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{path} holds no state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and not any(v.is_floating_point() for v in state.values()):
        raise ConvertError(f"{path} holds integer tensors only ({next(iter(state.values())).dtype}), not floating "
                           "point weights: not a release; pass the official file")  # fmt: skip
    return state


def is_safetensors(path: Path) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then a JSON header starting with ``{``."""
    with path.open("rb") as f:
        head = f.read(9)
    return (
        len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Plain bicubic resize of (N, C, H, W), as Rein's converters: align_corners=False, no antialias."""
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=False).to(
        x.dtype
    )


def rein_resample(
    state: dict[str, torch.Tensor], patch: int, grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Rein's p14 → p16 conversion on official names: kernel and position grid, plain bicubic."""
    state = dict(state)
    for k in KERNELS:
        if k in state and tuple(state[k].shape[-2:]) != (patch, patch):
            state[k] = bicubic(state[k], (patch, patch))
    for k in POSITIONS:
        if k not in state:
            continue
        pos = state[k]
        if pos.dim() == 4:  # SAM: (1, H, W, C)
            if tuple(pos.shape[1:3]) != grid:
                state[k] = bicubic(pos.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
            continue
        flat = pos.dim() == 2  # CLIP: (prefix + N, C)
        pos = pos[None] if flat else pos
        n = pos.shape[1]
        side = math.isqrt(n)
        prefix = n - side * side if side * side != n else 0
        side = math.isqrt(n - prefix)
        if side * side != n - prefix:
            raise ConvertError(
                f"{k} of shape {tuple(state[k].shape)} is not a square grid with prefix tokens"
            )
        if (side, side) != grid:
            c = pos.shape[-1]
            g = pos[:, prefix:].reshape(1, side, side, c).permute(0, 3, 1, 2)
            g = bicubic(g, grid).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)
            pos = torch.cat([pos[:, :prefix], g], dim=1)
        state[k] = pos[0] if flat else pos
    return state


def fit_rel_pos(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM relative-position tables (2·size − 1, head_dim) linearly resized to the model's, as SAM's get_rel_pos
    does at run time."""
    for k, v in state.items():
        if "rel_pos" in k and k in own and v.shape != own[k].shape:
            state[k] = F.interpolate(v.T[None].float(), size=own[k].shape[0], mode="linear").to(v.dtype)[0].T
    return state


def convert(family: str, src: str | Path, out: str | Path, model: str | None = None, patch_size: int = 16,
            img_size: int = 512, resample: str = "bicubic", model_kwargs: dict | None = None) -> dict:  # fmt: skip
    """Convert ``src`` and write ``out``; returns the provenance record."""
    if family not in FAMILIES:
        raise ConvertError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if resample not in ("bicubic", "pi", "none"):
        raise ConvertError(f"--resample {resample!r}; choose bicubic, pi or none")
    name = model or FAMILIES[family][0]
    if patch_size <= 0 or img_size < patch_size:
        raise ConvertError(f"--patch-size {patch_size} / --img-size {img_size}: both must be positive and the image "
                           "at least one patch (Rein's recipe: --patch-size 16 --img-size 512)")  # fmt: skip
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        raise ConvertError(f"--model {name!r} is not a timm model{f' (did you mean {close[0]}?)' if close else ''}; "
                           f"the {family} default is {FAMILIES[family][0]}")  # fmt: skip
    src, out = Path(src), Path(out)
    try:
        check_output_file(out, "--out", {"the official file": src})
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    state = read_release(src)
    patch = FAMILIES[family][1] if resample == "none" else patch_size
    kwargs = {"patch_size": patch, "img_size": img_size, **(model_kwargs or {})}
    target = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0, **kwargs)
    grid = tuple(target.patch_embed.grid_size)
    if resample == "bicubic":
        state = rein_resample(state, patch, grid)
    biased = dropped_dinov3_biases(state, target)
    if biased:
        raise ConvertError(f"{src} has non-zero attention q/v biases ({biased[0]}, {len(biased)} blocks) that "
                           f"{name} has no place for; use --model {name.split('.')[0]}_qkvb")  # fmt: skip
    try:
        state = timm_filter(state, target)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(
            f"{src} does not look like a {family} release: timm's filter failed with {e}"
        ) from None
    own = target.state_dict()
    state = fit_rel_pos({k: v for k, v in state.items() if k in own}, own)
    problem = state_mismatch(own, state)
    if problem:
        raise ConvertError(f"{src} does not fit {name} (patch {patch}, image {img_size}: {problem}); pass the "
                           f"official {family} release of this model, or --model for the release's size")  # fmt: skip
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    record = {"source": str(src), "source_sha256": digest, "family": family, "model": name, "patch_size": patch,
              "img_size": img_size, "resample": resample}  # fmt: skip
    with atomic_path(out) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp),
            metadata={k: str(v) for k, v in record.items()},
        )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=list(FAMILIES))
    p.add_argument("src", help="the official file")
    p.add_argument("--out", required=True, help="the .safetensors file to write (backbone.weights)")
    p.add_argument("--model", default=None, help="timm model name (default: the family's large / huge model)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--resample", default="bicubic", choices=["bicubic", "pi", "none"])
    a = p.parse_args(argv)
    try:
        print(json.dumps(convert(a.family, a.src, a.out, a.model, a.patch_size, a.img_size, a.resample)))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
