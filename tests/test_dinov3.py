"""DINOv3 backbones (timm's Eva class): Meta's .pth layout loads (directly and through the converter) to the same
model, a non-zero q/v bias the plain variant would drop is refused, names, normalisation and sizes (spec dinov3.md)."""

import pytest
import timm
import torch

from dgss.convert_weights import ConvertError, convert
from dgss.errors import ConfigError
from dgss.models.backbone import Backbone, supported_models

NAME = "vit_large_patch16_dinov3.lvd1689m"
SMALL = dict(depth=2, embed_dim=64, num_heads=2)


def meta_layout(state: dict[str, torch.Tensor], bias: float = 0.0) -> dict[str, torch.Tensor]:
    """timm's DINOv3 state in Meta's names (dinov3.md §3): storage_tokens, ls{1,2}.gamma, attn.qkv.{bias,bias_mask},
    mask_token, rope_embed.periods; the k third of the bias masked out as Meta's code does."""
    out = {}
    for k, v in state.items():
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        out[k] = v.clone()
    c = state["cls_token"].shape[-1]
    for i in range(len({k.split(".")[1] for k in state if k.startswith("blocks.")})):
        out[f"blocks.{i}.attn.qkv.bias"] = torch.full((3 * c,), bias)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)])
    out["mask_token"] = torch.zeros(1, c)
    out["rope_embed.periods"] = torch.ones(c // 2 // 2)
    return out


@pytest.fixture
def release(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(NAME.split(".")[0], pretrained=False, num_classes=0, **SMALL)
    for p in model.parameters():  # away from the init, so a wrong mapping shows
        p.data.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "dinov3_pretrain.pth"
    torch.save(meta_layout(model.state_dict()), path)
    return path, model


def test_meta_release_loads_directly_and_through_the_converter_to_the_same_model(tmp_path, release):
    path, model = release
    ref = Backbone(NAME, model_kwargs=SMALL).eval()
    ref.model.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref.model.state_dict()})
    direct = Backbone(NAME, weights=str(path), model_kwargs=SMALL).eval()
    out = tmp_path / "converted.safetensors"
    record = convert("dinov3", path, out, model=NAME, model_kwargs=SMALL)
    assert record["patch_size"] == 16 and record["family"] == "dinov3"
    converted = Backbone(NAME, weights=str(out), model_kwargs=SMALL).eval()
    assert direct.family == "eva" and direct.num_prefix_tokens == 5 and direct.patch_size == 16
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        for a, b, c in zip(ref(x), direct(x), converted(x)):
            assert a.shape == (2, 64, 3, 5)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_a_nonzero_qv_bias_the_plain_variant_would_drop_is_refused(tmp_path, release):
    _, model = release
    path = tmp_path / "biased.pth"
    torch.save(meta_layout(model.state_dict(), bias=0.1), path)
    with pytest.raises(
        ConfigError, match=r"non-zero attention q/v biases .* use backbone.name=vit_large_patch16_dinov3_qkvb"
    ):
        Backbone(NAME, weights=str(path), model_kwargs=SMALL)
    with pytest.raises(ConvertError, match="non-zero attention q/v biases"):
        convert("dinov3", path, tmp_path / "x.safetensors", model=NAME, model_kwargs=SMALL)
    assert not (tmp_path / "x.safetensors").exists()
    qkvb = Backbone("vit_large_patch16_dinov3_qkvb", weights=str(path), model_kwargs=SMALL)  # keeps them
    assert float(qkvb.model.blocks[0].attn.q_bias.abs().max()) == pytest.approx(0.1)


def test_names_hint_normalisation_and_sizes():
    names = supported_models()
    assert {"vit_large_patch16_dinov3", "vit_huge_plus_patch16_dinov3", "vit_small_patch16_dinov3"} <= set(
        names
    )
    with pytest.raises(ConfigError, match="did you mean vit_large_patch16_dinov3"):
        Backbone("vit_large_patch16_dinov", tiny=True)
    assert Backbone("vit_small_patch16_dinov3.lvd1689m", tiny=True).normalization == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # fmt: skip
    sat = Backbone("vit_large_patch16_dinov3.sat493m", tiny=True).normalization
    assert sat == ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
    want = {"vit_small_patch16_dinov3": 21.59, "vit_small_plus_patch16_dinov3": 28.68, "vit_base_patch16_dinov3": 85.64,
            "vit_large_patch16_dinov3": 303.08, "vit_huge_plus_patch16_dinov3": 840.51}  # fmt: skip
    for name, millions in want.items():
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == millions, name
