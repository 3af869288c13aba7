"""SoMA: minor-component factors, identity at init, counts, the official start, merge, weight-decay annealing, EMA,
and a checkpoint that restores without any SVD. Expected values are derived by hand from specs/soma.md."""

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers.builders import H, W, make_dm, make_method, snapshot, trainer
from helpers.runs import DATA, RUN, backbone_args

from dgss.callbacks import EMA
from dgss.checkpoint import section
from dgss.errors import ConfigError
from dgss.methods.recipe import cosine_weight_decay
from dgss.methods.soma import SoMA, SoMAFusedQKV, SoMALinear, default_start_block, singular_factors
from dgss.methods.summary import parameter_summary
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead

HEAD = functools.partial(LightHead, channels=8)


def soma(**kw):
    kw.setdefault("soma", dict(rank=4))
    return make_method(SoMA, **kw)


def test_factors_are_the_minor_components_and_rebuild_the_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.float64).float()
    sigma = torch.linalg.svdvals(w.double())
    for comp, want in (("minor", sigma[-4:]), ("principal", sigma[:4])):
        a, b = singular_factors(w, 4, scale=2.0, components=comp)
        assert a.shape == (4, 32) and b.shape == (48, 4)
        part = 2.0 * b @ a  # s·B·A
        got = torch.linalg.svdvals(part.double())[:4]
        assert torch.allclose(got.sort().values, want.sort().values, rtol=1e-4), comp
        # A Aᵀ = Bᵀ B = diag(σ_r / s)
        assert torch.allclose(a @ a.t(), torch.diag(want / 2.0).float(), atol=1e-5)
        assert torch.allclose(b.t() @ b, torch.diag(want / 2.0).float(), atol=1e-5)
    a, b = singular_factors(w, 4)
    residual = w - b @ a  # W minus its 4 minor components: its singular values are the other 28
    assert torch.allclose(torch.linalg.svdvals(residual.double())[:28], sigma[:28], rtol=1e-5)
    assert (w - (residual + b @ a)).abs().max() <= 1e-6 * w.abs().max()


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "eva02_small_patch14_224", "vit_large_patch16_dinov3",
                                  "vit_huge_plus_patch16_dinov3", "samvit_base_patch16"])  # fmt: skip
def test_identity_at_init_is_bit_exact_on_every_family(name):
    torch.manual_seed(0)
    bb = Backbone(name, tiny=True, model_kwargs=dict(qkv_fused=False) if name.startswith("eva02") else None)
    x = torch.randn(2, 3, 112, 224)  # a multiple of patches 14 and 16
    bb.eval()
    with torch.no_grad():
        before = bb(x)
    m = SoMA(bb, HEAD, num_classes=19, soma=dict(rank=4))
    m.configure_model()
    assert m.wrappers and all(isinstance(w, (SoMALinear, SoMAFusedQKV)) for w in m.wrappers)
    m.eval()
    with torch.no_grad():
        after = m.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fused_qkv_gets_one_adapter_per_third_from_its_own_rows():
    torch.manual_seed(0)
    m = soma()
    w = next(w for w in m.wrappers if isinstance(w, SoMAFusedQKV))
    c = w.qkv.in_features
    for j, p in enumerate("qkv"):
        a, b = singular_factors(w.qkv.weight[j * c : (j + 1) * c], 4, scale=16 / 4)  # s = alpha / r
        assert torch.equal(w.adapters[p].A0, a) and torch.equal(w.adapters[p].B0, b)
        assert torch.equal(w.adapters[p].A, a)


def test_counts_on_dinov2_l_are_the_specs():
    """DINOv2-L, r = 16, blocks 8-23: 16 x (4·(16·1024·2) + 16·(1024 + 4096)·2) = 4,718,592 adapter parameters and
    16 x (3072 + 1024 + 4096 + 1024) = 147,456 biases (spec §4). Built on the meta device, without the SVD."""
    with torch.device("meta"):
        bb = Backbone("vit_large_patch14_dinov2", model_kwargs=dict(patch_size=16), img_size=512)
        m = SoMA(bb, HEAD, num_classes=19)
        m.restoring = True
        m.configure_model()
    assert default_start_block(24) == 8 and default_start_block(12) == 4 and default_start_block(32) == 11
    s = m.extra_summary()
    assert s["params/soma_adapters"] == 4_718_592 and s["params/soma_biases"] == 147_456
    assert parameter_summary(m)["params/backbone_trainable"] == 4_866_048
    assert all(
        not p.requires_grad for n, p in m.backbone.named_parameters() if ".blocks.7." in n or "blocks.0." in n
    )


def test_training_moves_adapters_and_biases_only(tmp_path):
    torch.manual_seed(0)
    m = soma()
    before = snapshot(m)
    trainer(tmp_path, steps=2, limit_val_batches=0).fit(m, make_dm())
    moved = {k for k, v in snapshot(m).items() if not torch.equal(v, before[k])}
    bb = {k for k in moved if k.startswith("backbone.")}
    assert bb and all(k.endswith((".A", ".B", ".bias")) for k in bb), sorted(bb)[:5]
    start = default_start_block(m.backbone.num_blocks)
    assert not any(f"blocks.{i}." in k for k in bb for i in range(start))  # earlier blocks bit-identical
    assert not any(k.endswith((".A0", ".B0")) for k in moved)  # the frozen copies never move


def test_official_init_adds_the_minor_part_of_a_random_layer():
    """init: official (spec §2.2): the model at step 0 is W + s·B₀A₀, with (A₀, B₀) the minor factors of an
    nn.Linear-initialised matrix drawn from the seeded generator; no subtraction."""
    torch.manual_seed(0)
    m = soma(soma=dict(rank=4, init="official", seed=3))
    gen = torch.Generator().manual_seed(3)
    first = m.wrappers[0]
    weight, adapter = first.weights()[0]
    bound = 1.0 / math.sqrt(weight.shape[1])
    r = torch.empty(*weight.shape).uniform_(-bound, bound, generator=gen)
    a, b = singular_factors(r, 4, scale=16 / 4)
    assert torch.equal(adapter.A, a) and torch.equal(adapter.B, b)
    assert not adapter.subtract and float(adapter.A0.abs().sum()) == 0.0
    assert torch.allclose(adapter.weight_delta(), 4 * b @ a)


def test_bad_options_are_one_line():
    with pytest.raises(ConfigError, match="method.soma.targets"):
        soma(soma=dict(targets=["q", "mlp"]))
    with pytest.raises(ConfigError, match="start_block=9 is outside"):
        soma(soma=dict(start_block=9))
    with pytest.raises(ConfigError, match="use the plain name 'vit_small_patch16_dinov3'"):
        SoMA(Backbone("vit_small_patch16_dinov3_qkvb", tiny=True), HEAD, num_classes=19).configure_model()


def test_weight_decay_anneals_by_the_closed_form():
    t_max = 40_000
    assert cosine_weight_decay(0.05, 0, t_max, 1e-5) == pytest.approx(0.05, abs=1e-12)
    assert cosine_weight_decay(0.05, t_max // 2, t_max, 1e-5) == pytest.approx(0.025005, abs=1e-12)
    assert cosine_weight_decay(0.05, t_max, t_max, 1e-5) == pytest.approx(1e-5, abs=1e-12)
    assert cosine_weight_decay(0.0, t_max // 2, t_max, 1e-5) == 0.0
    assert cosine_weight_decay(0.0, t_max, t_max, 1e-5, zero="official") == pytest.approx(1e-5, abs=1e-12)
    assert cosine_weight_decay(0.0, 0, t_max, 1e-5, zero="official") == 0.0


def test_recipe_groups_and_the_annealed_decay_in_training(tmp_path):
    """The official paramwise_cfg: backbone tensors (biases too) at lr x 0.5 with decay; each group's decay at
    step t is the closed form of its own step-0 value."""
    torch.manual_seed(0)
    m = soma(scheduler=dict(weight_decay="cosine", weight_decay_min=1e-5))
    seen = []

    class Look(pl.Callback):
        def on_before_optimizer_step(self, tr, pm, optimizer):
            seen.append([(g["lr"], g["weight_decay"], g["initial_weight_decay"], g["names"] if "names" in g else None)
                         for g in optimizer.param_groups])  # fmt: skip

    trainer(tmp_path, steps=4, limit_val_batches=0, callbacks=[Look()]).fit(m, make_dm())
    opt = m.trainer.optimizers[0]
    bb = [
        g for g in opt.param_groups if all(n.startswith("backbone.") for n in g.get("names", ["backbone."]))
    ]
    base_lr = opt.defaults["lr"]
    groups = m.param_groups()
    bb_groups = [g for g in groups if g["names"][0].startswith("backbone.")]
    assert bb_groups and all(g["lr_mult"] == 0.5 and g["decay_mult"] == 1.0 for g in bb_groups)
    assert any(n.endswith(".bias") for g in bb_groups for n in g["names"])  # biases decay too
    assert bb is not None and base_lr == 1e-4
    for t, groups_t in enumerate(seen):
        for _, wd, wd0, _ in groups_t:
            assert wd == pytest.approx(cosine_weight_decay(wd0, t, 4, 1e-5), abs=1e-15)
    assert any(wd0 > 0 for _, _, wd0, _ in seen[0]) and seen[-1][0][1] != seen[0][0][1]


def test_ema_follows_mmengine_and_validation_uses_it(tmp_path):
    """avg = θ up to step max(begin, 1), then avg ← (1 − m)·avg + m·θ; validation during fit sees the average and
    the checkpoint holds it in state_dict, the raw weights under weight_averaging.raw."""
    torch.manual_seed(0)
    m = soma()
    ema = EMA(momentum=0.25, begin=2)
    raw, at_val = {}, {}

    class Look(pl.Callback):
        def on_train_batch_end(self, tr, pm, outputs, batch, batch_idx):
            raw[tr.global_step] = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

        def on_validation_batch_start(self, tr, pm, batch, batch_idx, dataloader_idx=0):
            at_val.update({n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad})

    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, steps=4, callbacks=[Look(), ema, ck]).fit(m, make_dm())  # the EMA callback runs first
    want = {n: v.clone() for n, v in raw[2].items()}  # copies through step 2 (= begin)
    for step in (3, 4):
        for n in want:
            want[n] = want[n] * 0.75 + raw[step][n] * 0.25
    for n, v in want.items():
        assert torch.allclose(ema.avg[n], v, atol=1e-6), n
        assert torch.allclose(at_val[n], v, atol=1e-6), n  # validation at step 4 ran on the average
        assert torch.equal(dict(m.named_parameters())[n], raw[4][n])  # and the raw weights came back
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    n = next(iter(want))
    assert torch.allclose(ckpt["state_dict"][n], want[n], atol=1e-6)
    assert torch.equal(section(ckpt, "weight_averaging")["raw"][n], raw[4][n])


def test_checkpoint_restores_without_svd_and_merges_to_a_plain_backbone(
    compose_cfg,
    tmp_path,
    weights,  # noqa: F811  (the fixture imported above)
    monkeypatch,
):
    """Train with EMA -> checkpoint (A, B, A₀, B₀ and biases; the frozen W from the weights file) -> dgss-eval
    reproduces the run with torch.linalg.svd unavailable; dgss-merge --backbone-out writes W' = W − s·B₀A₀ + s·B·A,
    and a plain Backbone from that file gives the adapted backbone's features."""
    from helpers.restore import assert_restores_and_folds

    from dgss.train import train

    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=soma", "method.soma.rank=4",
                       "method.soma.start_block=1", "method.optimizer.lr=1e-2", "callbacks.ema={_target_: dgss.callbacks.EMA, momentum: 0.5, begin: 1}"])  # fmt: skip
    metrics = train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    keys = [k for k in ckpt["state_dict"] if k.startswith("backbone.")]
    assert keys and all(k.endswith((".A", ".B", ".A0", ".B0", ".bias")) for k in keys)
    assert section(ckpt, "weight_averaging") is not None

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran while restoring a checkpoint")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    method = assert_restores_and_folds(compose_cfg, ckpt_path, metrics, tmp_path, H, W)
    assert any(
        float(w.adapters["q"].weight_delta().abs().max() if isinstance(w, SoMAFusedQKV) else 0) > 0
        for w in method.wrappers
    )  # fmt: skip  (trained: the fold is not the identity)


def test_ema_resumes_exactly(tmp_path):
    """Crash after step 2, resume from its checkpoint: the raw weights and the averages at step 4 equal a straight
    run's (the checkpoint's state_dict holds the averages, weight_averaging.raw the weights the run goes on from)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, tr, pm, batch, batch_idx):
            steps.append(tr.global_step)

    def run(folder, resume=None):
        torch.manual_seed(0)
        m, ema = soma(), EMA(momentum=0.5, begin=1)
        ck = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="s{step}")
        steps.clear()
        trainer(folder, steps=4, limit_val_batches=0, callbacks=[ema, ck, Count()]).fit(
            m, make_dm(), ckpt_path=resume
        )
        return {n: p.detach().clone() for n, p in m.named_parameters()}, {
            n: a.clone() for n, a in ema.avg.items()
        }

    raw, avg = run(tmp_path / "straight")
    assert steps == [0, 1, 2, 3]
    step2 = tmp_path / "straight" / "sstep=2.ckpt"
    assert section(torch.load(step2, weights_only=False), "weight_averaging") is not None
    raw2, avg2 = run(tmp_path / "resumed", resume=str(step2))
    assert steps == [2, 3]  # it did resume
    assert avg.keys() == avg2.keys() and avg
    for n in raw:
        assert torch.equal(raw[n], raw2[n]), n
    for n in avg:
        assert torch.allclose(avg[n], avg2[n], atol=1e-7, rtol=0), n
    assert any(not torch.equal(avg[n], raw[n]) for n in avg)  # the average is not the weights


def test_an_official_release_imports_onto_the_official_start():
    """Spec §6 names: lora_A (r × in), lora_B (out × r) per q, k, v, proj, fc1, fc2 and those layers' biases. Loaded
    with init=official (W kept), the backbone computes x·(W + s·B·A)ᵀ + b: checked against a plain timm backbone whose
    weights are folded here by hand from the same tensors. A release that does not fit is one line."""
    torch.manual_seed(0)
    m = soma(soma=dict(rank=4, init="official"))
    with pytest.raises(ConfigError, match="init=official"):
        soma().load_official_adapters({})
    bb = m.backbone.model
    c, start, s = m.backbone.embed_dim, default_start_block(m.backbone.num_blocks), 16 / 4
    plain = {k.replace(".qkv.qkv.", ".qkv.").replace(".base.", "."): v.clone()  # the frozen layers' own tensors
             for k, v in m.backbone.model.state_dict().items() if ".adapter" not in k}  # fmt: skip
    release, folded = {}, plain
    for i in range(start, m.backbone.num_blocks):
        layers = {**{p: (c, c) for p in "qkv"}, "proj": (c, c), "fc1": (4 * c, c), "fc2": (c, 4 * c)}
        for p, (out, inp) in layers.items():
            where = f"blocks.{i}.{'attn' if p in ('q', 'k', 'v', 'proj') else 'mlp'}.{p}"
            a, b, bias = torch.randn(4, inp) * 0.1, torch.randn(out, 4) * 0.1, torch.randn(out) * 0.1
            release.update({f"module.backbone.model.{where}.lora_A.weight": a,
                            f"module.backbone.model.{where}.lora_B.weight": b, f"module.backbone.model.{where}.bias": bias})  # fmt: skip
            if p in "qkv":  # timm's fused qkv: rows q, k, v
                j = "qkv".index(p)
                folded[f"blocks.{i}.attn.qkv.weight"][j * c : (j + 1) * c] += s * b @ a
                folded[f"blocks.{i}.attn.qkv.bias"][j * c : (j + 1) * c] = bias
            else:
                folded[f"{where}.weight"] += s * b @ a
                folded[f"{where}.bias"] = bias
    release["decode_head.ignored"] = torch.zeros(1)
    loaded = m.load_official_adapters({"state_dict": release}["state_dict"])
    assert len(loaded) == len(release) - 1
    ref = Backbone("vit_small_patch14_reg4_dinov2", img_size=(H, W), model_kwargs=dict(depth=2, embed_dim=32, num_heads=2,
                                                                                 patch_size=8))  # fmt: skip
    ref.model.load_state_dict({k: v for k, v in folded.items()})
    x = torch.randn(2, 3, H, W)
    m.eval()
    ref.eval()
    with torch.no_grad():
        for got, want in zip(m.backbone(x), ref(x)):
            assert torch.allclose(got, want, atol=1e-5)
    del release[f"module.backbone.model.blocks.{start}.mlp.fc2.lora_B.weight"]
    with pytest.raises(
        ConfigError, match=r"1 missing, 0 mis-shaped tensors: missing backbone.model.blocks.1.mlp.fc2"
    ):
        m.load_official_adapters(release)
    assert bb is m.backbone.model
