"""RecycleLoRA: the layer against a re-derivation of the official one (scipy's pivoted QR, the 0/1 selection matrices,
the residual written into the weight, its forward), identity at init on every family, one training step per family,
the counts on DINOv2-L derived by hand, the recipe's parameter groups, and a checkpoint that restores without a QR and
merges to a plain backbone. Expected values come from specs/recyclelora.md."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.builders import H, W, make_method, snapshot
from helpers.runs import DATA, RUN, backbone_args
from scipy import linalg

from dgss.errors import ConfigError
from dgss.methods import recyclelora as rl
from dgss.methods.recyclelora import RecycleLoRA, RecycleLoRALinear, pivoted_qr_factors
from dgss.methods.summary import parameter_summary
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead

HEAD = functools.partial(LightHead, channels=8)


class OfficialRecycleLoRALinear:
    """The official ``RecycleLoRALinear`` re-derived from its source (rein/models/backbones/recyclelora_linear.py):
    each adapter from its own ``linalg.qr(W, pivoting=True, mode="economic")``, A filled element by element, the
    residual W − scaling·(B_main A_main + B_sub A_sub) written over the weight, and its forward."""

    def __init__(self, weight, bias, r, r_main, lora_alpha):
        self.r_main = min(r_main, r)
        self.r_sub = r - self.r_main
        self.scaling = lora_alpha / r
        w = weight.clone().float()
        self.bias = bias
        self.A_main, self.B_main = self.components(w, self.r_main, use_top=False)
        self.A_sub, self.B_sub = self.components(w, self.r_sub, use_top=True)
        delta = self.B_main @ self.A_main + self.B_sub @ self.A_sub
        self.weight = w - delta * self.scaling

    @staticmethod
    def components(weight, r, use_top):
        q, _, p = linalg.qr(weight.detach().cpu().numpy(), pivoting=True, mode="economic")
        num_cols = q.shape[1]
        r = min(r, num_cols)
        if use_top:
            q_sel, cols = q[:, :r], [p[i] for i in range(r)]
        else:
            q_sel, cols = q[:, num_cols - r :], [p[num_cols - r + i] for i in range(r)]
        a = np.zeros((r, weight.shape[1]), dtype=np.float32)
        for i in range(r):
            a[i, cols[i]] = 1.0
        return torch.from_numpy(a).float(), torch.from_numpy(np.ascontiguousarray(q_sel)).float()

    def forward(self, x):
        result = F.linear(x, self.weight, bias=self.bias)
        result += (x @ self.A_main.T) @ self.B_main.T * self.scaling
        result += (x @ self.A_sub.T) @ self.B_sub.T * self.scaling
        return result


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_the_layer_equals_the_official_one_on_random_weights(shape):
    """Factors equal the official ones exactly; the forward at step 0 equals the official residual layer's (within
    the rounding of its subtraction, which dgss does not make: identity is exact here), and after the adapters move
    (the same A, B given to both) the two still compute the same function; the fold is the official residual plus the
    adapters."""
    torch.manual_seed(sum(shape))
    base = torch.nn.Linear(shape[1], shape[0])
    ref = OfficialRecycleLoRALinear(base.weight.detach(), base.bias.detach(), r=12, r_main=8, lora_alpha=1.0)
    layer = RecycleLoRALinear(base, 8, 4, 1.0 / 12)
    layer.initialise()
    for name, (a, b) in (("main", (ref.A_main, ref.B_main)), ("sub", (ref.A_sub, ref.B_sub))):
        adapter = getattr(layer, f"lora_{name}")
        assert torch.equal(adapter.A, a) and torch.equal(adapter.B, b), name
        assert torch.equal(adapter.A0, a) and torch.equal(adapter.B0, b), name
        assert (adapter.A.sum(1) == 1).all() and (a.sum(0) <= 1).all()  # one input column per row, none twice
    x = torch.randn(5, shape[1])
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # dgss: exactly the pretrained layer
        torch.testing.assert_close(layer(x), ref.forward(x), rtol=1e-5, atol=1e-5)
        for adapter in (layer.lora_main, layer.lora_sub):  # a training step's worth of change
            adapter.A.add_(0.1 * torch.randn_like(adapter.A))
            adapter.B.add_(0.1 * torch.randn_like(adapter.B))
        ref.A_main, ref.B_main = layer.lora_main.A.clone(), layer.lora_main.B.clone()
        ref.A_sub, ref.B_sub = layer.lora_sub.A.clone(), layer.lora_sub.B.clone()
        torch.testing.assert_close(layer(x), ref.forward(x), rtol=1e-5, atol=1e-5)
        folded = layer.fold()
        assert type(folded) is torch.nn.Linear
        want = ref.weight + ref.scaling * (ref.B_main @ ref.A_main + ref.B_sub @ ref.A_sub)
        torch.testing.assert_close(folded.weight, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(folded.bias, base.bias)


def test_the_main_adapter_takes_the_minor_pivots_and_the_sub_adapter_the_major_ones():
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.linspace(0.1, 3.0, 24)  # column norms grow left to right
    _, _, piv = linalg.qr(w.numpy(), pivoting=True, mode="economic")
    f = pivoted_qr_factors(w, 6, 3)
    assert f["sub"][0].argmax(1).tolist() == piv[:3].tolist()
    assert f["main"][0].argmax(1).tolist() == piv[24 - 6 :].tolist()
    # the sub adapter's columns are the largest-norm ones, the main adapter's among the smallest left
    norms = w.norm(dim=0)
    assert norms[piv[:3]].min() > norms[piv[24 - 6 :]].max()


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "eva02_small_patch14_224", "vit_large_patch16_dinov3",
                                  "samvit_base_patch16", "vit_base_patch16_clip_224"])  # fmt: skip
def test_identity_at_init_and_one_training_step_on_every_family(name):
    """Every linear layer of every block wrapped; the backbone at step 0 bit-identical to the pretrained one; one
    optimizer step moves the adapters and nothing else of the backbone (A₀, B₀, weights and biases fixed)."""
    torch.manual_seed(0)
    bb = Backbone(name, tiny=True, model_kwargs=dict(qkv_fused=False) if name.startswith("eva02") else None)
    x = torch.randn(2, 3, 112, 224)  # a multiple of patches 14 and 16
    bb.eval()
    with torch.no_grad():
        before = bb(x)
    m = RecycleLoRA(bb, HEAD, num_classes=19, recyclelora=dict(r_max=12, r_main=8))
    m.configure_model()
    linears = sum(type(mod) is torch.nn.Linear for blk in m.backbone.model.blocks for mod in blk.modules())
    assert linears == len(m.wrappers) and all(
        isinstance(w, RecycleLoRALinear) for w in m.wrappers
    )  # the bases
    m.eval()
    with torch.no_grad():
        after = m.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    m.train()
    frozen = snapshot(m)
    opt = m.build_optimizer()
    labels = torch.randint(0, 19, (2, 112, 224))
    sum(m.training_losses(x, labels).values()).backward()
    opt.step()
    moved = {k for k, v in snapshot(m).items() if k.startswith("backbone.") and not torch.equal(v, frozen[k])}
    assert moved and all(k.endswith((".A", ".B")) for k in moved), sorted(moved)[:5]
    assert any(".lora_main." in k for k in moved) and any(".lora_sub." in k for k in moved)


def test_counts_on_dinov2_l_are_derived_by_hand():
    """Spec: per block 36 × ((1024 + 3072) + (1024 + 1024) + (1024 + 4096) + (4096 + 1024)) = 589,824 (main 32 ×
    16,384 = 524,288, sub 4 × 16,384 = 65,536), × 24 blocks = 14,155,776. (The official count adds its mask token's
    1,024, which no forward reads and timm's DINOv2 does not have.) Built on the meta device, without the QR."""
    per_block = (1024 + 3072) + (1024 + 1024) + (1024 + 4096) + (4096 + 1024)
    with torch.device("meta"):
        bb = Backbone("vit_large_patch14_dinov2", model_kwargs=dict(patch_size=16), img_size=512)
        m = RecycleLoRA(bb, HEAD, num_classes=19)
        m.restoring = True
        m.configure_model()
    assert getattr(bb.model, "mask_token", None) is None
    assert parameter_summary(m)["params/backbone_trainable"] == 36 * per_block * 24 == 14_155_776
    s = m.extra_summary()
    assert (
        s["params/recyclelora_main"] == 32 * per_block * 24
        and s["params/recyclelora_sub"] == 4 * per_block * 24
    )
    assert len(m.wrappers) == 96 and m.options.scale == pytest.approx(1 / 36)


def test_the_recipe_groups_adapters_and_anneals_the_decay(compose_cfg):
    """The official paramwise keys: main adapter lr × 1, sub adapter lr × 0.5, both without decay (the adapters' keys
    beat ``backbone``); the recipe anneals weight decay (cosine to 1e-5)."""
    from dgss.config import build_method

    cfg = compose_cfg(["experiment=gta2cbm/recyclelora_dinov2_l", "backbone.weights=null", "backbone.tiny=true",
                       "trainer=cpu"])  # fmt: skip
    assert cfg.method.scheduler.weight_decay == "cosine" and cfg.method.scheduler.weight_decay_min == 1e-5
    m = build_method(cfg)
    opt = m.build_optimizer()
    seen = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            kind = "main" if ".lora_main." in n else "sub" if ".lora_sub." in n else None
            if kind:
                seen.setdefault(kind, set()).add((g["lr"], g["weight_decay"]))
    assert seen == {"main": {(1e-4, 0.0)}, "sub": {(0.5e-4, 0.0)}}


def test_bad_options_are_one_line():
    with pytest.raises(ConfigError, match=r"need 0 <= r_main <= r_max"):
        make_method(RecycleLoRA, recyclelora=dict(r_max=4, r_main=8))
    with pytest.raises(ConfigError, match=r"start_block=9 is outside the backbone's 2 blocks"):
        make_method(RecycleLoRA, recyclelora=dict(start_block=9))


def test_checkpoint_restores_without_a_qr_and_merges_to_a_plain_backbone(
    compose_cfg,
    tmp_path,
    weights,  # noqa: F811  (the fixture imported above)
    monkeypatch,
):
    """Train -> checkpoint (A, B, A₀, B₀; the frozen W from the weights file) -> dgss-eval reproduces the run with the
    QR unavailable; dgss-merge --backbone-out writes the folded weights, and a plain Backbone from that file gives the
    adapted backbone's features."""
    from helpers.restore import assert_restores_and_folds

    from dgss.train import train

    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=recyclelora", "method.recyclelora.r_max=6",
                       "method.recyclelora.r_main=4", "method.optimizer.lr=1e-2"])  # fmt: skip
    metrics = train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    keys = [k for k in torch.load(ckpt_path, weights_only=False)["state_dict"] if k.startswith("backbone.")]
    assert keys and all(k.endswith((".A", ".B", ".A0", ".B0")) for k in keys)

    def no_qr(*a, **k):
        raise AssertionError("a QR ran while restoring a checkpoint")

    monkeypatch.setattr(rl.linalg, "qr", no_qr)
    method = assert_restores_and_folds(compose_cfg, ckpt_path, metrics, tmp_path, H, W)
    assert any(
        float(w.lora_main.weight_delta().abs().max()) > 0 for w in method.wrappers
    )  # trained: not identity
