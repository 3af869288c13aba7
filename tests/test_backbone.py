import pytest
import timm
import torch

from dgss.errors import ConfigError
from dgss.models.backbone import Backbone, default_out_indices

FAMILIES = {  # name -> (family, prefix tokens)
    "vit_large_patch14_reg4_dinov2.lvd142m": ("vit", 5),
    "eva02_large_patch14_224.mim_m38m": ("eva", 1),
    "samvit_base_patch16.sa1b": ("sam", 0),
    "vit_large_patch14_clip_224.openai": ("vit", 1),
    "vit_large_patch16_dinov3.lvd1689m": ("eva", 5),  # RoPE, CLS + 4 registers
    "vit_huge_plus_patch16_dinov3.lvd1689m": ("eva", 5),  # SwiGLU
}


def _x(bb, b=2, gh=3, gw=5):
    torch.manual_seed(0)
    return torch.randn(b, 3, gh * bb.patch_size, gw * bb.patch_size)


@pytest.mark.parametrize("name", FAMILIES)
def test_features_match_timm_and_hooks_see_one_layout(name):
    family, prefix = FAMILIES[name]
    bb = Backbone(name, tiny=True, img_size=64).eval()
    assert bb.family == family and bb.num_prefix_tokens == prefix and bb.num_blocks == 4
    x = _x(bb)
    feats = bb(x)
    ref = bb.model.forward_intermediates(x, indices=bb.out_indices, intermediates_only=True, norm=False)
    assert len(feats) == 4
    for f, r in zip(feats, ref):
        assert f.shape == (2, 64, 3, 5)
        torch.testing.assert_close(f, r, rtol=0, atol=0)
    seen = []
    handle = bb.register_block_hook(lambda t, i: (seen.append((i, tuple(t.shape))), t)[1])
    torch.testing.assert_close(bb(x)[-1], feats[-1], rtol=0, atol=0)  # identity hook changes nothing
    assert seen == [(i, (2, prefix + 15, 64)) for i in range(4)]
    handle.remove()
    assert bb._block_hooks == {}


@pytest.mark.parametrize("name", FAMILIES)
def test_hook_output_feeds_the_next_block_and_prefix_is_addressable(name):
    bb = Backbone(name, tiny=True, img_size=64).eval()
    x = _x(bb)
    base = bb(x)

    def bump_patches_after_block_1(tokens, i):
        if i != 1:
            return tokens
        out = tokens.clone()
        out[:, bb.num_prefix_tokens :] *= 1.5
        return out

    bb.register_block_hook(bump_patches_after_block_1)
    out = bb(x)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=0)  # block 0 is before the hook
    torch.testing.assert_close(out[1], 1.5 * base[1])  # block 1's features carry the hook's output
    assert not torch.allclose(out[2], base[2], atol=1e-3)  # and block 2 saw it as input (its own output
    assert not torch.equal(
        out[2], 1.5 * base[2]
    )  # is not just the scaled residual; LayerScale keeps it small)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_parts_expose_attention_and_mlp(name):
    family, _ = FAMILIES[name]
    bb = Backbone(name, tiny=True, img_size=64)
    for i in range(bb.num_blocks):
        p = bb.block_parts(i)
        assert bb.model.get_submodule(p.path) is p.block
        if family == "eva" and "dinov3" not in name:  # EVA02 models use separate q/k/v projections
            assert p.qkv is None and all(
                m.in_features == 64 and m.out_features == 64 for m in (p.q, p.k, p.v)
            )
        else:  # DINOv3: a fused qkv without bias, biases nowhere else (the plain variant)
            assert p.qkv.in_features == 64 and p.qkv.out_features == 192 and p.q is None
            assert not p.qkv_bias_in_attn
        assert p.proj.out_features == 64 and hasattr(p.mlp, "fc2")
        if family == "sam":
            assert p.global_attn == (i in (1, 3))


def test_default_out_indices_follow_rein():
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(4) == [0, 1, 2, 3]


def test_weights_file_loads_through_timm_filter(tmp_path):
    kwargs = dict(depth=2, embed_dim=64, num_heads=2)
    src = timm.create_model("vit_large_patch14_dinov2", num_classes=0, img_size=56, **kwargs)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    # same grid: bit-exact
    bb = Backbone("vit_large_patch14_dinov2.lvd142m", weights=str(path), img_size=56, model_kwargs=kwargs)
    own = bb.model.state_dict()
    assert set(own) == set(src.state_dict()) - {
        "norm.weight",
        "norm.bias",
    }  # final norm unused (final_norm=False)
    for k, v in own.items():
        assert torch.equal(v, src.state_dict()[k]), k
    # other grid: timm's filter resamples the position embedding
    bb2 = Backbone("vit_large_patch14_dinov2.lvd142m", weights=str(path), img_size=112, model_kwargs=kwargs)
    assert bb2.model.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.equal(bb2.model.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert bb2.identity["weights_sha256"] and bb2.identity["weights"] == str(path)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        Backbone("vit_large_patch14_dinov3_typo")
    msg = str(e.value)
    assert "backbone.name='vit_large_patch14_dinov3_typo'" in msg and "vit_large_patch14_dinov2" in msg
    assert "samvit_huge_patch16" in msg and "eva02_large_patch14_224" in msg and "\n" not in msg


def test_missing_and_mismatched_weights_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone.weights='.*nope.pth' does not exist"):
        Backbone("vit_large_patch14_dinov2", weights=str(tmp_path / "nope.pth"), img_size=56,
                 model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))  # fmt: skip
    small = timm.create_model(
        "vit_large_patch14_dinov2", num_classes=0, img_size=56, depth=1, embed_dim=64, num_heads=2
    )
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(
        ConfigError, match=r"does not fit backbone.name='vit_large_patch14_dinov2'.*missing: blocks.1"
    ) as e:
        Backbone(
            "vit_large_patch14_dinov2",
            weights=str(path),
            img_size=56,
            model_kwargs=dict(depth=2, embed_dim=64, num_heads=2),
        )
    assert "\n" not in str(e.value)
    wide = timm.create_model(
        "vit_large_patch14_dinov2", num_classes=0, img_size=56, depth=2, embed_dim=96, num_heads=2
    )
    torch.save(wide.state_dict(), path)
    with pytest.raises(ConfigError, match=r"shape mismatch: .*\(96"):
        Backbone(
            "vit_large_patch14_dinov2",
            weights=str(path),
            img_size=56,
            model_kwargs=dict(depth=2, embed_dim=64, num_heads=2),
        )
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable (PyTorch )?checkpoint"):
        Backbone(
            "vit_large_patch14_dinov2",
            weights=str(path),
            img_size=56,
            model_kwargs=dict(depth=2, embed_dim=64, num_heads=2),
        )


def test_tiny_with_weights_is_refused():
    with pytest.raises(ConfigError, match="backbone.tiny=true .* backbone.weights="):
        Backbone("vit_large_patch14_dinov2", weights="x.pth", tiny=True)


# ------------------------------------------------------------------------------- backbone.weights=hub
def _hub_cache(root, repo, filename, state):
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main names a snapshot holding the file."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / filename))
    return snap / filename


def test_hub_weights_come_from_the_cache_offline_and_say_how_to_get_them_otherwise(tmp_path, monkeypatch):
    name, small = "vit_small_patch14_dinov2.lvd142m", dict(depth=2, embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    src = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0, img_size=518, **small)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as e:  # offline, nothing cached: one line, the model and both fixes
        Backbone(name, weights="hub", img_size=518, model_kwargs=small)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "timm/vit_small_patch14_dinov2.lvd142m" in msg
        and "is not in the Hugging Face cache" in msg
    )
    assert "go online once" in msg and "backbone.weights=<path>" in msg
    path = _hub_cache(
        tmp_path / "hub", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", src.state_dict()
    )
    bb = Backbone(name, weights="hub", img_size=518, model_kwargs=small).eval()
    assert (
        bb.weights == str(path) and bb.identity["weights_sha256"] is not None
    )  # checkpoints re-attach this file
    x = torch.randn(1, 3, 28, 42)
    ref = Backbone(name, weights=str(path), img_size=518, model_kwargs=small).eval()
    torch.testing.assert_close(bb(x)[-1], ref(x)[-1], rtol=0, atol=0)
    with pytest.raises(
        ConfigError, match="timm has no Hugging Face copy of 'vit_small_patch14_dinov2.no_such_tag'"
    ):
        Backbone("vit_small_patch14_dinov2.no_such_tag", weights="hub", model_kwargs=small)


class _BaseReader(torch.nn.Module):
    """An adapter that reads its base layer's weight itself (as SoMA's does): that weight must stay float32."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.delta = torch.nn.Parameter(torch.zeros_like(base.weight))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.base.weight + self.delta, self.base.bias)


_BaseReader.__module__ = "dgss.methods.example"  # a dgss module, as the methods' own are


@pytest.mark.parametrize("method", ["frozen", "peft_like"])
def test_a_frozen_backbones_weights_are_cast_once_with_bit_identical_outputs_and_gradients(method):
    """Issue 26 (4): under bf16 autocast a frozen plain Linear / conv weight is cast once (not on every forward, as
    autocast does for tensors without grad), with the same rounding: features and every trainable gradient bit-identical
    to autocast's per-forward casts; a weight inside a dgss module (which may read it in float32) is left alone; a
    changed weight (a load) is cast again."""
    torch.manual_seed(0)
    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 64),
                  model_kwargs=dict(depth=3, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    bb.requires_grad_(False)
    if method == "peft_like":
        blk = bb.model.blocks[1]
        blk.attn.qkv = _BaseReader(blk.attn.qkv)
    x = torch.randn(2, 3, 32, 64, requires_grad=True)
    trainable = [x, *(p for p in bb.parameters() if p.requires_grad)]

    def run(once: bool):
        bb.cast.enabled = once
        casts = []

        class Casts(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                    casts.append(tuple(args[0].shape))
                return func(*args, **kwargs)

        with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
            feats = bb(x)
        grads = torch.autograd.grad(sum(f.float().sum() for f in feats), trainable)
        return feats, grads, casts

    per_forward, g_per_forward, casts_before = run(False)
    run(True)  # the first forward makes the casts
    once, g_once, casts_after = run(True)
    assert all(torch.equal(a, b) for a, b in zip(per_forward, once))
    assert all(torch.equal(a, b) for a, b in zip(g_per_forward, g_once))
    weights = {tuple(p.shape) for p in bb.parameters() if p.dim() == 2}
    castable = bb.cast.castable()
    assert len(castable) == (
        26 if method == "frozen" else 24
    )  # qkv's weight and bias inside the adapter stay
    assert len([c for c in casts_after if c in weights]) < len([c for c in casts_before if c in weights]) - 10
    if method == "peft_like":
        assert all("blocks.1.attn.qkv" not in n for n, _ in castable)
    with torch.no_grad():  # a changed weight is cast again
        bb.model.blocks[0].mlp.fc1.weight.mul_(2)
    bb.cast.enabled = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        changed = bb(x)
    bb.cast.enabled = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = bb(x)
    assert all(torch.equal(a, b) for a, b in zip(changed, want)) and not torch.equal(changed[0], once[0])


def test_the_cast_once_scan_sees_a_layer_wrapped_after_a_forward():
    """The scan for castable layers is cached; wrapping a layer (or a module above it) in a dgss module afterwards
    makes a new scan, so the adapter's base weight is not swapped for a bf16 copy."""
    torch.manual_seed(0)
    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 64),
                  model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    bb.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bb(torch.randn(1, 3, 32, 64))
    assert any("blocks.1.attn.qkv" in n for n, _ in bb.cast.castable())
    bb.model.blocks[1].attn.qkv = _BaseReader(bb.model.blocks[1].attn.qkv)
    assert not any("blocks.1.attn.qkv" in n for n, _ in bb.cast.castable())
    wrapper = _BaseReader(torch.nn.Linear(2, 2))
    wrapper.inner = bb.model.blocks[0].mlp  # a module above the layers: its Linears are now a dgss module's
    bb.model.blocks[0].mlp = wrapper
    assert not any("blocks.0.mlp" in n for n, _ in bb.cast.castable())
