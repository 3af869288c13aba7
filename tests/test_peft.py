"""LoRA, AdaptFormer, VPT-deep and SAM-COBOT: parameter counts, the quaternion head, cross-block gradients,
identity at init, what trains, and every method on every family."""

import functools

import pytest
import torch
from helpers.builders import make_dm, snapshot, trainer

from dgss.methods.cobot import Cobot, CobotState, quaternion_matrix
from dgss.methods.peft import VPT, AdaptFormer, LoRA
from dgss.methods.summary import parameter_summary
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead


def build(cls, name, meta=True, img_size=224, model_kwargs=None, **kw):
    """A method on a full-size backbone; on the meta device (shapes only) for counting."""
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        bb = Backbone(name, img_size=img_size, model_kwargs=model_kwargs)
        m = cls(bb, functools.partial(LightHead, channels=16), num_classes=19, **kw)
        m.configure_model()
        return m


# ------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    "cls, name, kw, want",
    [(LoRA, "vit_base_patch16_224", {"peft": {"rank": 4}}, 147_456),
     (AdaptFormer, "vit_base_patch16_224", {"peft": {"bottleneck": 16, "norm": True}}, 322_752),
     (LoRA, "vit_large_patch14_dinov2", {"peft": {"rank": 8}}, 786_432),
     (AdaptFormer, "vit_large_patch14_dinov2", {}, 3_171_840),  # the defaults: Chen et al.'s original
     (VPT, "vit_large_patch14_dinov2", {"peft": {"num_tokens": 150}}, 3_686_400)],
)  # fmt: skip
def test_base_parameter_counts(cls, name, kw, want):
    assert build(cls, name, **kw).peft_parameters() == want


@pytest.mark.parametrize(
    "base, name, extra, base_count",
    [("lora", "samvit_base_patch16", 864, 147_456),
     ("adaptformer", "vit_base_patch16_224", 1_296, 322_752),
     ("lora", "vit_large_patch14_dinov2", 2_880, 393_216),
     ("adaptformer", "vit_large_patch14_dinov2", 2_880, 860_544)],
)  # fmt: skip
def test_cobot_extra_parameter_counts(base, name, extra, base_count):
    m = build(Cobot, name, img_size=1024 if "sam" in name else 224, base=base)
    assert m.cobot_parameters() == extra and m.peft_parameters() == base_count
    # shared C and S are registered once: in the module's parameters and in the optimizer groups
    names = [n for n, _ in m.named_parameters() if n.startswith("cobot.")]
    assert sorted(names) == sorted(
        {f"cobot.{n}" for n in ("coef", "relation", "gamma", "q_r", "q_i", "q_j", "q_k")}
    )
    grouped = [n for g in m.param_groups() for n in g["names"] if n.startswith("cobot.")]
    assert sorted(grouped) == sorted(names)


# ------------------------------------------------------------------------------------ quaternion head
def test_quaternion_head_is_the_hamilton_block_product():
    torch.manual_seed(0)
    state = CobotState(hidden=8, slices=3, init="identity").double()
    n = 2
    with torch.no_grad():
        for p in (state.q_r, state.q_i, state.q_j, state.q_k):
            p.copy_(torch.randn_like(p))
    assert sum(p[0].numel() for p in (state.q_r, state.q_i, state.q_j, state.q_k)) == 8 * 8 // 4
    h = torch.randn(5, 8, dtype=torch.float64)
    hr, hi, hj, hk = h.split(n, -1)
    R, I, J, K = (p[1] for p in (state.q_r, state.q_i, state.q_j, state.q_k))  # noqa: E741 (the paper's names)
    want = torch.cat([hr @ R - hi @ I - hj @ J - hk @ K,
                      hr @ I + hi @ R - hj @ K + hk @ J,
                      hr @ J + hi @ K + hj @ R - hk @ I,
                      hr @ K - hi @ J + hj @ I + hk @ R], -1)  # fmt: skip
    # identity init: coefficients C S + gamma = 1, so the code reaches the head unchanged
    assert torch.allclose(state(h, 1), want)
    eye = quaternion_matrix(torch.eye(2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    assert torch.equal(eye, torch.eye(8))


def test_a_loss_on_one_block_reaches_every_blocks_coefficients_through_s():
    torch.manual_seed(0)
    state = CobotState(hidden=4, slices=6, init="official")
    with torch.no_grad():
        state.relation.add_(0.1 * torch.rand(6, 6))  # a trained S is no longer the identity
    state(torch.randn(3, 4), 2).pow(2).sum().backward()
    assert (state.coef.grad.abs().sum(0) > 0).all()  # every slice's column of C
    assert (state.relation.grad[:, 2].abs() > 0).all() and (
        state.relation.grad[:, [0, 1, 3, 4, 5]] == 0
    ).all()
    assert (state.gamma.grad[2].abs() > 0).all() and (state.gamma.grad[[0, 1, 3, 4, 5]] == 0).all()
    # at init (S = I) the gradient already reaches every relation entry of the slice
    fresh = CobotState(hidden=4, slices=6, init="official")
    fresh(torch.randn(3, 4), 2).pow(2).sum().backward()
    assert (fresh.relation.grad[:, 2].abs() > 0).all()


def test_cobot_on_a_backbone_couples_the_blocks():
    """Through the real wrappers: a loss on block 0's output moves S entries that tie block 0 to the others."""
    torch.manual_seed(0)
    m = build(Cobot, "vit_small_patch14_dinov2", meta=False, img_size=32, base="lora", cobot={"init": "official"},
              model_kwargs=dict(depth=3, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    out = {}
    m.backbone.register_block_hook(lambda t, i: out.setdefault(i, t) if i == 0 else t)
    m.backbone(torch.randn(2, 3, 32, 32))
    out[0].pow(2).mean().backward()
    g = m.cobot.relation.grad
    assert (g[:, 0].abs() > 0).all() and (g[:, 1].abs() > 0).all()  # slices 0 (q) and 1 (v) of block 0
    assert (g[:, 2:] == 0).all()  # later blocks cannot affect block 0's output


# ----------------------------------------------------------------------------------- identity at init
FAMILIES = {
    "dinov2": "vit_small_patch14_reg4_dinov2",
    "eva02": "eva02_large_patch14_224.mim_m38m",
    "sam": "samvit_base_patch16",
    "clip": "vit_large_patch14_clip_224.openai",
}


PATCH = {"dinov2": 14, "eva02": 14, "sam": 16, "clip": 14}


def tiny(cls, family, **kw):
    torch.manual_seed(0)
    bb = Backbone(FAMILIES[family], tiny=True, img_size=4 * PATCH[family])
    m = cls(bb, functools.partial(LightHead, channels=16), num_classes=19, **kw)
    m.configure_model()
    return m


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "cls, kw",
    [(LoRA, {}), (AdaptFormer, {}), (Cobot, {"base": "lora"}), (Cobot, {"base": "adaptformer"})],
    ids=["lora", "adaptformer", "cobot_lora", "cobot_adaptformer"],
)
def test_identity_init_equals_the_frozen_backbone(cls, kw, family):
    torch.manual_seed(0)
    size = 4 * PATCH[family]
    frozen = Backbone(FAMILIES[family], tiny=True, img_size=size).eval()
    m = tiny(cls, family, **kw).eval()  # same seed: the same backbone weights before wrapping
    assert torch.equal(m.backbone.model.patch_embed.proj.weight, frozen.model.patch_embed.proj.weight)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for a, b in zip(m.backbone(x), frozen(x)):
            assert torch.equal(a, b)


def test_official_lora_init_moves_the_model():
    m = tiny(Cobot, "dinov2", base="lora", cobot={"init": "official"})
    q = m.backbone.model.blocks[0].attn.qkv.q
    assert q.up.weight.abs().sum() > 0 and m.cobot.gamma.eq(1).all() and m.cobot.q_r.eq(0).all()


def test_vpt_on_sam_reimplements_timms_attention_and_prompts_act_as_keys():
    from dgss.methods.peft_layers import PromptedSAMAttention

    torch.manual_seed(0)
    bb = Backbone("samvit_base_patch16", tiny=True, img_size=64)
    for blk in bb.model.blocks[:2]:  # a windowed and a global block
        x = torch.randn(2, 4, 4, 64)
        ref = blk.attn(x)
        assert torch.allclose(PromptedSAMAttention(blk.attn, blk.norm1, 64, 0)(x), ref, atol=1e-5)
        wrapped = PromptedSAMAttention(blk.attn, blk.norm1, 64, 3)
        out = wrapped(x)
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        out.sum().backward()
        assert wrapped.prompts.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize(
    "cls, kw",
    [(LoRA, {}), (AdaptFormer, {}), (VPT, {"peft": {"num_tokens": 3}}), (Cobot, {"base": "lora", "cobot": {"init": "official"}}),
     (Cobot, {"base": "adaptformer"})],
    ids=["lora", "adaptformer", "vpt", "cobot_lora", "cobot_adaptformer"],
)  # fmt: skip
def test_only_peft_and_head_change(tmp_path, cls, kw):
    torch.manual_seed(0)
    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 64),
                  model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    m = cls(bb, functools.partial(LightHead, channels=16), num_classes=19, **kw)
    m.configure_model()
    before = snapshot(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    trainer(tmp_path, steps=3).fit(m, make_dm())
    after = dict(m.named_parameters())
    frozen_keys = {n for n in after if n not in trainable}
    assert frozen_keys and all(n.startswith("backbone.") for n in frozen_keys)
    assert all(torch.equal(after[n].detach(), before[n]) for n in frozen_keys)  # backbone bit-identical
    changed = {n for n in trainable if not torch.equal(after[n].detach(), before[n])}
    assert changed == trainable, trainable - changed
    assert not m.backbone.model.training  # frozen backbone stays in eval mode


def test_cobot_core_at_identity_is_plain_lora_for_any_a_b_and_its_lr_multipliers():
    torch.manual_seed(1)
    cob = tiny(Cobot, "dinov2", base="lora", cobot={"lr_mult": 10.0})
    plain = tiny(LoRA, "dinov2")
    with torch.no_grad():
        for blk_c, blk_p in zip(cob.backbone.model.blocks, plain.backbone.model.blocks):
            for part in ("q", "v"):
                lc, lp = getattr(blk_c.attn.qkv, part), getattr(blk_p.attn.qkv, part)
                lc.up.weight.normal_()
                lp.up.weight.copy_(lc.up.weight)
                lp.down.weight.copy_(lc.down.weight)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(cob.backbone(x), plain.backbone(x)):
            assert torch.allclose(a, b, atol=1e-6)
    mults = {n: g["lr_mult"] for g in cob.param_groups() for n in g["names"]}
    assert mults["cobot.coef"] == mults["cobot.relation"] == mults["cobot.q_r"] == 10.0
    assert mults["cobot.gamma"] == 1.0 and mults["head.classifier.weight"] == 1.0
    decay = {n for g in cob.param_groups() if g["decay_mult"] > 0 for n in g["names"]}
    assert not any(n.startswith("cobot.") for n in decay)


# ------------------------------------------------------------------ AdaptFormer as the official code computes it
def _randomise_adapters(m):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.backbone.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return m


def chen_block(blk, adapter_sd, x, scale):
    """ShoufaChen/AdaptFormer ``Block.forward`` (ffn_option parallel, layernorm_option none) on a timm block's
    tensors: ``x = x + attn; adapt = s · up(relu(down(x))); x = x + mlp(norm2(x)) + adapt`` (dropout off). On a
    LayerScale block (DINOv2) the MLP term is ``ls2(mlp(norm2(x)))``; the adapter term stays unscaled."""
    x = x + blk.ls1(blk.attn(blk.norm1(x)))
    h = torch.relu(x @ adapter_sd["down.weight"].T + adapter_sd["down.bias"])
    adapt = scale * (h @ adapter_sd["up.weight"].T + adapter_sd["up.bias"])
    return x + blk.ls2(blk.mlp(blk.norm2(x))) + adapt


def cobot_block(blk, adapter_sd, x, inside_ls2):
    """SAM-COBOT's adapter (``remote/model``: the adapter wraps the MLP with its own LayerNorm, scale 1):
    ``mlp'(u) = mlp(u) + up(relu(down(LN(u))))``, u = norm2(x); ``inside_ls2`` = DINOv2's ls2 over both terms."""
    x = x + blk.ls1(blk.attn(blk.norm1(x)))
    u = blk.norm2(x)
    a = torch.nn.functional.layer_norm(
        u, (u.shape[-1],), adapter_sd["ln.weight"], adapter_sd["ln.bias"], 1e-5
    )
    adapt = torch.relu(a @ adapter_sd["down.weight"].T + adapter_sd["down.bias"]) @ adapter_sd["up.weight"].T
    adapt = adapt + adapter_sd["up.bias"]
    mlp = blk.mlp(u)
    return x + (blk.ls2(mlp + adapt) if inside_ls2 else blk.ls2(mlp) + adapt)


@pytest.mark.parametrize("position", ["after_ls2", "inside_mlp"])
def test_adaptformer_block_equals_chen_et_al_and_sam_cobot(position):
    """A DINOv2 block (LayerScale 1e-5-like gammas made distinct) with random adapters: the default AdaptFormer is
    Chen et al.'s block exactly; SAM-COBOT's variant joins after ls2 by default, and ``inside_mlp`` is the scaled
    variant (the adapter term multiplied by ls2, measured below)."""
    torch.manual_seed(0)
    kw = dict(meta=False, img_size=28, model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 4})
    plain = build(AdaptFormer, "vit_small_patch14_dinov2", peft={"position": position}, **kw)
    cob = build(Cobot, "vit_small_patch14_dinov2", base="adaptformer", peft={"position": position}, **kw)
    for m in (plain, cob):
        _randomise_adapters(m)
        for blk in m.backbone.model.blocks:
            with torch.no_grad():
                blk.ls2.gamma.uniform_(0.05, 0.5)
        m.eval()
    x = torch.randn(2, 10, plain.backbone.embed_dim)
    for m, kind in ((plain, "chen"), (cob, "cobot")):
        blk = m.backbone.model.blocks[0]
        sd = {k.split("adapter.", 1)[1]: v for k, v in blk.state_dict().items() if "adapter." in k}
        orig = types_simple_block(blk)
        with torch.no_grad():
            got = blk(x)
            if kind == "chen":
                want = chen_block(orig, sd, x, 0.1)
                if position == "inside_mlp":  # the scaled variant: ls2 multiplies the adapter term too
                    want = x + orig.ls1(orig.attn(orig.norm1(x)))
                    want = want + orig.ls2(orig.mlp(orig.norm2(want)) + 0.1 * (torch.relu(
                        want @ sd["down.weight"].T + sd["down.bias"]) @ sd["up.weight"].T + sd["up.bias"]))  # fmt: skip
            else:
                want = cobot_block(orig, sd, x, inside_ls2=position == "inside_mlp")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def types_simple_block(blk):
    """The block's own frozen modules, unwrapped (norm2, mlp and drop_path2 as timm built them)."""
    import types

    norm2 = blk.norm2.norm
    mlp = blk.mlp.inner if hasattr(blk.mlp, "adapter") else blk.mlp
    return types.SimpleNamespace(
        norm1=blk.norm1, attn=blk.attn, ls1=blk.ls1, ls2=blk.ls2, norm2=norm2, mlp=mlp
    )


def test_adaptformer_defaults_are_chen_et_al_and_cobot_keeps_sam_cobots_variant(compose_cfg):
    from dgss.methods.cobot import CobotAdapterOptions
    from dgss.methods.peft_layers import AdapterOptions

    assert AdapterOptions() == AdapterOptions(bottleneck=64, scale=0.1, dropout=0.1, norm=False, input="block",
                                              position="after_ls2")  # fmt: skip
    assert CobotAdapterOptions() == CobotAdapterOptions(bottleneck=16, scale=1.0, dropout=0.1, norm=True,
                                                        input="mlp", position="after_ls2")  # fmt: skip
    for exp, want in (("gta2cbm/adaptformer_dinov2_l", 64), ("gta2cbm/cobot_adaptformer_dinov2_l", 16)):
        peft = compose_cfg([f"experiment={exp}"]).method.peft
        assert (
            peft.bottleneck == want
            and peft.norm == (want == 16)
            and peft.input == ("mlp" if want == 16 else "block")
        )


# ------------------------------------------------------------------ COBOT's ablations, as the official code runs them
def official_adapter_relation_code(down_x, c, p, idx, gamma, head, variant):
    """SAM-COBOT ``medical/train.py`` ``Adapter_relation.forward``, the code before ReLU, and its commented
    ablation lines: CP = (FacT_c @ FacT_p)[..., idx]; ``dual``: d1(h·CP + γ·h); ablation 1 (no head):
    h·CP + γ·h; ablation 2 (γ only): d1(γ·h); ablation 3: γ·h. ``head`` is ``FacT_d1`` (a callable) or None."""
    if variant == "mc_only":
        code = gamma * down_x
    else:
        cp = (c[None] @ p)[..., idx][0]
        code = down_x * cp + gamma * down_x if variant == "dual" else down_x * cp
    return code if head is None else head(code)


@pytest.mark.parametrize("coefficients", ["dual", "lm_only", "mc_only"])
@pytest.mark.parametrize("head", ["linear", "none"])
def test_cobot_ablations_compute_the_official_codes(coefficients, head):
    """COBOT's core on random C, S, γ and a linear head (the official ``LORA_relation``'s nn.Linear) equals the
    official lines; the extra-parameter count drops exactly the removed sets."""
    torch.manual_seed(0)
    v, slices = 16, 12
    st = CobotState(v, slices, head=head, init="official", coefficients=coefficients)
    with torch.no_grad():
        for prm in st.parameters():
            prm.normal_()
    h = torch.randn(5, v)
    linear = None
    for s in (0, 7):
        if head == "linear":
            linear = torch.nn.Linear(v, v, bias=False)
            with torch.no_grad():
                linear.weight.copy_(st.linear[s].T)  # dgss keeps M = W.T: y = h @ M = linear(h)
        want = official_adapter_relation_code(
            h, getattr(st, "coef", None), getattr(st, "relation", None), s, getattr(st, "gamma", [None] * slices)[s],
            linear, coefficients,
        )  # fmt: skip
        torch.testing.assert_close(st(h, s), want)
    sizes = {
        "dual": v * slices + slices**2 + slices * v,
        "lm_only": v * slices + slices**2,
        "mc_only": slices * v,
    }
    heads = {"linear": slices * v * v, "none": 0}
    assert sum(p.numel() for p in st.parameters()) == sizes[coefficients] + heads[head]


def test_cobot_relation_ablations_and_the_official_linear_head_init():
    torch.manual_seed(0)
    learn = CobotState(16, 12, relation="learnable")
    fixed = CobotState(16, 12, relation="fixed_random")
    frozen = CobotState(16, 12, relation="identity_frozen")
    names = lambda st: {n for n, _ in st.named_parameters()}  # noqa: E731
    assert "relation" in names(learn) and "relation" not in names(fixed) | names(
        frozen
    )  # buffers: never trained
    assert "relation" in dict(fixed.named_buffers()) and torch.equal(frozen.relation, torch.eye(12))
    assert not torch.equal(fixed.relation, torch.eye(12)) and torch.allclose(
        fixed.relation.sum(0), torch.ones(12)
    )
    # the extra count: S leaves it when fixed (spec §5 counts a learnable S)
    assert sum(p.numel() for p in learn.parameters()) - sum(p.numel() for p in fixed.parameters()) == 144
    # official LORA_relation: nn.Linear(V, V, bias=False) keeps PyTorch's init, U(-1/sqrt(V), 1/sqrt(V))
    lin = CobotState(4, 6, head="linear", init="official").linear
    assert lin.abs().max() <= 0.5 and (lin < 0).any() and lin.std() > 0.1
    # a Cobot method logs its base and extra counts (spec §8)
    m = build(Cobot, "samvit_base_patch16", img_size=1024, base="lora")
    s = parameter_summary(m)
    assert s["params/cobot_extra"] == 864 and s["params/peft_base"] == 147_456
