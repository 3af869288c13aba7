import math

import numpy as np
import pytest
import timm
import torch

from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.methods.rein import ReinLayers, load_official_state_dict
from dgss.train import train


@pytest.mark.parametrize(
    "layers, dim, rank, expected",
    [(24, 1024, 16, 2_990_081), (24, 1024, None, 5_016_065), (12, 768, 16, 1_741_569), (12, 384, 16, 684_033),
     (4, 1280, 16, 3_892_481)],
)  # fmt: skip
def test_parameter_counts_match_the_paper(layers, dim, rank, expected):
    r = ReinLayers(layers, dim, lora_rank=rank)
    assert sum(p.numel() for p in r.parameters()) == expected


def test_official_names_shapes_and_init_bounds():
    torch.manual_seed(0)
    r = ReinLayers(24, 1024)
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert shapes == {
        "scale": (), "learnable_tokens_a": (24, 100, 16), "learnable_tokens_b": (24, 16, 1024),
        "mlp_token2feat.weight": (1024, 1024), "mlp_token2feat.bias": (1024,), "mlp_delta_f.weight": (1024, 1024),
        "mlp_delta_f.bias": (1024,), "transform.weight": (256, 1024), "transform.bias": (256,),
        "merge.weight": (256, 768), "merge.bias": (256,),
    }  # fmt: skip
    assert r.token_init_bound == pytest.approx(0.081832, abs=1e-6)
    assert r.learnable_tokens_a.abs().max() <= 0.0818317 and r.learnable_tokens_b.abs().max() <= 0.0818317
    assert r.learnable_tokens_a.abs().max() > 0.08  # uniform over the whole range
    assert float(r.tokens().std()) == pytest.approx(0.00893, rel=0.05)
    assert r.mlp_token2feat.weight.abs().max() <= 1 / 32 and r.mlp_delta_f.weight.abs().max() <= 1 / 32
    assert float(r.scale) == pytest.approx(1e-3)
    full = ReinLayers(24, 1024, lora_rank=None)
    assert full.token_init_bound == pytest.approx(0.05786, abs=1e-5) and full.learnable_tokens.shape == (
        24,
        100,
        1024,
    )
    assert r.queries().shape == (100, 256)


def _fixed(r: ReinLayers):
    """Deterministic, non-random weights (float64)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(r.named_parameters())):
            n = p.numel()
            p.copy_((torch.arange(n, dtype=torch.float64).reshape(p.shape) * 0.37 + i).sin() * 0.5)
    return r


def _ref_forward(sd, x, layer, prefix, c, softmax=True):
    t = sd["learnable_tokens_a"][layer] @ sd["learnable_tokens_b"][layer]
    f = x[:, prefix:]
    logits = f @ t.T
    if softmax:
        logits = logits / math.sqrt(c)
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
    else:
        s = logits
    v = t[1:] @ sd["mlp_token2feat.weight"].T + sd["mlp_token2feat.bias"]
    delta = s[..., 1:] @ v
    out = f + sd["scale"] * ((delta + f) @ sd["mlp_delta_f.weight"].T + sd["mlp_delta_f.bias"])
    return np.concatenate([x[:, :prefix], out], axis=1)


def _ref_queries(sd, layers):
    t = np.stack([sd["learnable_tokens_a"][i] @ sd["learnable_tokens_b"][i] for i in range(layers)])
    p = t @ sd["transform.weight"].T + sd["transform.bias"]
    qmax, qavg, qlast = p.max(0), p.mean(0), p[-1]
    m, q = qmax.shape
    z = np.empty((m, 3 * q))
    for j in range(q):  # interleaved per channel
        z[:, 3 * j], z[:, 3 * j + 1], z[:, 3 * j + 2] = qmax[:, j], qavg[:, j], qlast[:, j]
    return z @ sd["merge.weight"].T + sd["merge.bias"]


@pytest.mark.parametrize("softmax", [True, False])
def test_float64_forward_and_queries_match_an_independent_numpy_reference(softmax):
    r = _fixed(ReinLayers(2, 4, num_tokens=3, lora_rank=2, query_dim=2, use_softmax=softmax).double())
    sd = {k: v.detach().numpy() for k, v in r.state_dict().items()}
    x = np.cos(np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4) * 0.9)  # B 2, prefix 2 + N 2, C 4
    for layer in (0, 1):
        out = r(torch.from_numpy(x), layer, num_prefix_tokens=2).detach().numpy()
        np.testing.assert_allclose(out, _ref_forward(sd, x, layer, 2, 4, softmax), rtol=1e-12, atol=1e-12)
        assert np.array_equal(out[:, :2], x[:, :2])  # prefix tokens untouched, bit for bit
    np.testing.assert_allclose(r.queries().detach().numpy(), _ref_queries(sd, 2), rtol=1e-12, atol=1e-12)
    # the layout guard: the blocked [max | avg | last] concatenation gives other queries
    t = r.tokens()
    p = r.transform(t)
    blocked = r.merge(torch.cat([p.max(0).values, p.mean(0), p[-1]], dim=-1))
    assert not torch.allclose(blocked, r.queries())


def test_token_zero_is_a_sink_and_features_enter_delta_f():
    r = _fixed(ReinLayers(1, 4, num_tokens=3, lora_rank=None, query_dim=2).double())
    f = torch.tensor([[[1.0, 0.5, -0.5, 0.25]]], dtype=torch.float64)
    with torch.no_grad():
        r.learnable_tokens[0, 0] = 1e4 * f[0, 0]  # token 0 takes all the attention mass
    out = r(f, 0, num_prefix_tokens=0)
    expected = f + r.scale * r.mlp_delta_f(f)  # ΔF = 0: only the features' own delta_f term remains
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_identity_at_init_option():
    r = ReinLayers(3, 8, num_tokens=4, lora_rank=2, query_dim=4, zero_mlp_delta_f=True)
    x = torch.randn(2, 1 + 6, 8)
    for layer in range(3):
        assert torch.equal(r(x, layer), x)
    assert "scale" not in dict(r.named_parameters()) and float(r.scale) == 1.0


def test_load_official_state_dict_round_trip_and_mismatch():
    src = ReinLayers(4, 32, num_tokens=5, lora_rank=4, query_dim=8)
    official = {
        "meta": {},
        "state_dict": {f"backbone.reins.{k}": v.clone() for k, v in src.state_dict().items()},
    }
    official["state_dict"]["decode_head.querys2feat.weight"] = torch.zeros(8, 8)
    dst = ReinLayers(4, 32, num_tokens=5, lora_rank=4, query_dim=8)
    loaded = load_official_state_dict(dst, official)
    assert "learnable_tokens_a" in loaded and "merge.weight" in loaded
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    other = ReinLayers(2, 32, num_tokens=5, lora_rank=4, query_dim=8)
    with pytest.raises(
        ConfigError,
        match=r"does not fit ReinLayers\(num_layers=2.*learnable_tokens_a \(4, 5, 4\) vs \(2, 5, 4\)",
    ):
        load_official_state_dict(other, official)
    full = ReinLayers(4, 32, num_tokens=5, lora_rank=None, query_dim=8)
    with pytest.raises(ConfigError, match="missing: learnable_tokens; unexpected: learnable_tokens_a"):
        load_official_state_dict(full, official)
    with pytest.raises(ConfigError, match="no Rein tensors"):
        load_official_state_dict(dst, {"state_dict": {"backbone.blocks.0.x": torch.zeros(1)}})


# ---------------------------------------------------------------------------------------------- method
FAST = ["debug=tiny", "method=rein", "method.rein.num_tokens=8", "method.rein.lora_rank=4", "method.rein.query_dim=16",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "synthetic.val_length=2", "callbacks=minimal", "~logger"]  # fmt: skip
FAMILIES = ["dinov2_l_reg", "eva02_l", "samvit_h", "clip_l"]


@pytest.mark.parametrize("backbone", FAMILIES)
def test_rein_trains_with_frozen_backbone_on_every_family(compose_cfg, backbone, monkeypatch):
    import dgss.train as train_mod

    captured = {}
    real_build = train_mod.build_method

    def spy(cfg, **kw):
        m = real_build(cfg, **kw)
        captured["m"] = m
        captured["backbone"] = {k: v.clone() for k, v in m.backbone.state_dict().items()}
        captured["rein"] = {k: v.clone() for k, v in m.reins.state_dict().items()}
        captured["head"] = {k: v.clone() for k, v in m.head.state_dict().items() if v.is_floating_point()}
        modes = captured["modes"] = []
        m.backbone.register_forward_pre_hook(lambda mod, a: modes.append(mod.training))
        prefix = captured["prefix"] = []
        P = m.backbone.num_prefix_tokens
        m.backbone.register_block_hook(lambda t, i: (prefix.append(t[:, :P].clone()), t)[1])
        return m

    monkeypatch.setattr(train_mod, "build_method", spy)
    metrics = train(compose_cfg([f"backbone={backbone}", *FAST]))
    m = captured["m"]
    assert "val/mean_mIoU" in metrics
    expected_layers = 2 if backbone == "samvit_h" else 4  # tiny SAM: global attention at blocks 1 and 3
    assert m.reins.num_layers == expected_layers
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, captured["backbone"][k]), k
    for k, v in m.reins.state_dict().items():
        assert not torch.equal(v, captured["rein"][k]), k
    for k, v in m.head.state_dict().items():
        if k in captured["head"] and not k.endswith(("running_mean", "running_var")):
            assert not torch.equal(v, captured["head"][k]), k
    assert captured["modes"] and not any(captured["modes"])
    opt = {id(p) for g in m.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt == {id(p) for p in [*m.reins.parameters(), *m.head.parameters()]}
    no_decay = {n for g in m.param_groups() if g["decay_mult"] == 0 for n in g["names"]}
    assert {"reins.learnable_tokens_a", "reins.learnable_tokens_b", "reins.scale"} <= no_decay
    assert "reins.mlp_delta_f.weight" not in no_decay


def test_rein_checkpoint_holds_only_rein_and_head_and_eval_reproduces(compose_cfg, tmp_path):
    kw = dict(depth=2, embed_dim=64, num_heads=2, patch_size=16)
    m = timm.create_model("vit_large_patch14_reg4_dinov2", num_classes=0, img_size=64, **kw)
    weights = tmp_path / "w.pth"
    torch.save(m.state_dict(), weights)
    bb = ["backbone=dinov2_l_reg", f"backbone.weights={weights}", "backbone.img_size=64", "backbone.out_indices=[0,1]",
          *[f"+backbone.model_kwargs.{k}={v}" for k, v in kw.items() if k != "patch_size"]]  # fmt: skip
    run = ["data=synthetic", "synthetic.height=64", "synthetic.width=128", "synthetic.train_length=8", "synthetic.val_length=3",
           "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "trainer=cpu", "trainer.max_steps=3",
           "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0", "~logger", "callbacks=default",
           "~callbacks.progress_bar", "~callbacks.media", "method=rein", "method.rein.num_tokens=8"]  # fmt: skip
    metrics = train(compose_cfg([*run, *bb]))
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"reins", "head"}
    again = evaluate(compose_cfg([f"ckpt_path={ckpt_path}", "trainer=cpu"], config_name="eval"))
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/night/mIoU"):
        assert again[k] == metrics[k], k


def test_query_link_feeds_a_query_head_and_is_skipped_for_the_light_head():
    import functools

    from dgss.methods.rein import Rein
    from dgss.models.backbone import Backbone
    from dgss.models.heads.light import LightHead

    class QueryHead(LightHead):  # satisfies dgss.models.heads.protocol.QueryHead
        dim = 8

        def forward(self, features, queries=None):
            self.seen = queries
            return super().forward(features) + queries.mean()

        def link(self, num_queries):
            self.linked = num_queries

        def load_official(self, state):
            raise NotImplementedError

    def build(head):
        bb = Backbone("vit_large_patch14_dinov2", tiny=True, img_size=64)
        m = Rein(bb, functools.partial(head, channels=8), num_classes=5,
                 rein={"num_tokens": 6, "lora_rank": 2, "query_dim": 8})  # fmt: skip
        m.configure_model()
        return m

    m = build(QueryHead)
    x, y = torch.randn(2, 3, 56, 56), torch.randint(0, 5, (2, 56, 56))
    sum(m.head.loss(m(x), y).values()).backward()
    assert m.head.seen.shape == (6, 8) and m.head.linked == 6
    assert m.reins.transform.weight.grad.abs().sum() > 0 and m.reins.merge.weight.grad.abs().sum() > 0
    light = build(LightHead)
    assert not light.reins.link_token_to_query and not hasattr(light.reins, "transform")
