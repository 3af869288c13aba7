"""dgss-convert-weights (dgss/convert_weights.py): random models written in each release's official layout (Meta DINOv2 .pth, EVA02
{'module': ...}, SAM image_encoder.*, OpenAI CLIP TorchScript) come back through the backbone loader unchanged,
except the patch kernel and position grid, which equal Rein's plain bicubic conversion."""

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import dgss.convert_weights as cw
from dgss.models.backbone import Backbone

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _timm(name: str, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **SMALL, **kw)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _rename(state: dict, swaps: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in state.items():
        for a, b in swaps:
            k = k.replace(a, b)
        out[k] = v
    return out


class _Archive(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript(state: dict, path: Path) -> None:
    root = _Archive()
    for name, t in state.items():
        mod, *parts = root, *name.split(".")
        for p in parts[:-1]:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(parts[-1], nn.Parameter(t))
    torch.jit.save(torch.jit.script(root), str(path))


def official(family: str, path: Path) -> dict:
    """A random tiny model in the release's layout; returns its timm-named tensors for comparison."""
    if family == "dinov2":
        ref = _timm("vit_small_patch14_dinov2", img_size=70)  # 5x5 grid at patch 14
        torch.save({**ref, "mask_token": torch.zeros(1, 64)}, path)  # Meta naming = timm naming + mask_token
    elif family == "eva02":
        ref = _timm("eva02_large_patch14_224", img_size=70)
        swaps = [("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"),
                 ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("fc_norm", "norm")]  # fmt: skip
        torch.save({"module": {**_rename(ref, swaps), "mask_token": torch.zeros(1, 1, 64)}}, path)
    elif family == "sam":
        ref = _timm("samvit_base_patch16", img_size=128, global_attn_indexes=(1,), window_size=4)
        state = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in ref.items()}
        torch.save({**state, "prompt_encoder.point_embeddings.0.weight": torch.zeros(1, 256)}, path)
    else:
        ref = _timm("vit_large_patch14_clip_224", img_size=70)
        swaps = [("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
                 ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
        state = _rename({k: v for k, v in ref.items() if not k.startswith("norm.")}, swaps)
        state.update({"ln_post.weight": ref["norm.weight"], "ln_post.bias": ref["norm.bias"],
                      "class_embedding": ref["cls_token"][0, 0], "positional_embedding": ref["pos_embed"][0],
                      "proj": torch.randn(64, 32)})  # fmt: skip
        _torchscript({"visual." + k.replace("in_proj_.", "in_proj_"): v for k, v in state.items()}, path)
    return ref


MODELS = {"dinov2": "vit_small_patch14_dinov2", "eva02": "eva02_large_patch14_224",
          "sam": "samvit_base_patch16", "clip": "vit_large_patch14_clip_224"}  # fmt: skip


@pytest.mark.parametrize("family", list(MODELS))
def test_converter_round_trips_the_official_layout(tmp_path, family):
    src, out = tmp_path / "release.pth", tmp_path / "converted.safetensors"
    ref = official(family, src)
    extra = {"global_attn_indexes": (1,), "window_size": 4} if family == "sam" else {}
    record = cw.convert(
        family, src, out, MODELS[family], patch_size=16, img_size=64, model_kwargs={**SMALL, **extra}
    )
    assert record["resample"] == "bicubic" and len(record["source_sha256"]) == 64
    bb = Backbone(
        MODELS[family], weights=str(out), img_size=64, model_kwargs={"patch_size": 16, **SMALL, **extra}
    )
    got = bb.model.state_dict()
    kernel = ref["patch_embed.proj.weight"]
    want_kernel = (
        F.interpolate(kernel, size=(16, 16), mode="bicubic", align_corners=False)
        if kernel.shape[-1] != 16
        else kernel
    )
    torch.testing.assert_close(got["patch_embed.proj.weight"], want_kernel, rtol=0, atol=0)
    pos = ref["pos_embed"]
    if family == "sam":  # (1, 8, 8, C) NHWC -> 4x4
        want_pos = F.interpolate(
            pos.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
        ).permute(0, 2, 3, 1)
    else:  # (1, 1 + 5·5, C) -> 1 + 4·4, the class entry kept
        grid = pos[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
        grid = (
            F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
            .permute(0, 2, 3, 1)
            .reshape(1, 16, -1)
        )
        want_pos = torch.cat([pos[:, :1], grid], 1)
    torch.testing.assert_close(got["pos_embed"], want_pos, rtol=0, atol=1e-6)
    same = [
        k
        for k in got
        if k in ref and "pos_embed" not in k and "patch_embed.proj.weight" not in k and "rel_pos" not in k
    ]
    assert len(same) > 20
    for k in same:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    if family == "sam":  # global block: rel-pos table (2·8 − 1) -> (2·4 − 1), as SAM interpolates at run time
        rel = ref["blocks.1.attn.rel_pos_h"]
        want = F.interpolate(rel.T[None], size=7, mode="linear")[0].T
        torch.testing.assert_close(got["blocks.1.attn.rel_pos_h"], want)


def test_timm_resampling_differs_and_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "release.pth"
    official("dinov2", src)
    kw = {"model_kwargs": SMALL, "patch_size": 16, "img_size": 64}
    cw.convert("dinov2", src, tmp_path / "rein.safetensors", MODELS["dinov2"], resample="bicubic", **kw)
    cw.convert("dinov2", src, tmp_path / "timm.safetensors", MODELS["dinov2"], resample="pi", **kw)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "rein.safetensors"), load_file(tmp_path / "timm.safetensors")
    assert not torch.allclose(
        a["patch_embed.proj.weight"], b["patch_embed.proj.weight"]
    )  # why Rein needs its own way
    assert cw.main(["clip", str(src), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
