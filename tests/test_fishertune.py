"""FisherTune: Fisher estimates, DR-FIM, schedule, selection, masked optimisation, sparse checkpoints."""

import math

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers.builders import make_dm, make_method, snapshot, trainer
from helpers.runs import DATA, RUN

from dgss.checkpoint import section
from dgss.config import build_method
from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.methods.fishertune import (
    GROUPS,
    FimScore,
    FisherTune,
    apportion,
    dr_fim,
    growth_ratio,
    kind_counts,
    top_k_first,
)
from dgss.methods.guard import running_buffers
from dgss.methods.selected_adamw import SelectedAdamW
from dgss.models.style_perturb import ChannelStatPerturbation
from dgss.train import train

SCHED = dict(warmup_iters=2, growth_tau=3, growth_end=8, refresh_every=2, delta_min=0.01, delta_max=0.05)


def nan_on(m, when):
    """Make every loss of ``m``'s forward passes NaN on the calls (counted from 1) where ``when(call)`` holds."""
    forward, calls = m.fisher_forward, []

    def patched(images, labels):
        calls.append(None)
        output, losses, fisher_loss = forward(images, labels)
        if when(len(calls)):
            return output, {k: v * float("nan") for k, v in losses.items()}, fisher_loss * float("nan")
        return output, losses, fisher_loss

    m.fisher_forward = patched


def fishertune(**kw):
    """A tiny FisherTune: its option groups (``method.fishertune.<group>``) and the base's options by keyword."""
    groups = {g: kw.pop(g) for g in GROUPS if g in kw}
    groups.setdefault("schedule", SCHED)
    groups.setdefault("perturb", dict(after_blocks=[0]))
    groups.setdefault("fisher", dict(window=2))
    return make_method(FisherTune, fishertune=groups, **kw)


# ------------------------------------------------------------------------------------------- formulas
def test_dr_fim_equals_the_formula_on_hand_made_values():
    fx = torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    fp = torch.tensor([0.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    gamma, tau_inv2, eps, eps_bar = 2.0, 0.5, 1e-8, 0.3
    for factor, c in (("mul_gamma", gamma), ("div_gamma", 1 / gamma)):
        got = dr_fim(fx, fp, eps_bar, gamma, tau_inv2, eps, factor)
        for i in range(4):
            lx, lp = fx[i].item() / gamma + tau_inv2, fp[i].item() / gamma + tau_inv2
            want = gamma * (lx - tau_inv2) + math.exp(-eps_bar) * c * abs(lx - lp) / (min(lx, lp) + eps)
            assert got[i].item() == pytest.approx(want, rel=1e-12), (factor, i)
    # element 1 by hand: lx = 1, lp = 2 -> 2*(1-0.5) + e^-0.3 * 2 * 1 / 1
    assert dr_fim(fx, fp, eps_bar, gamma, tau_inv2, eps)[1].item() == pytest.approx(1.0 + 2 * math.exp(-0.3))


def test_dr_fim_stays_finite_because_of_the_prior():
    zero = torch.zeros(5)
    assert torch.equal(dr_fim(zero, zero, 0.0), zero)  # F(x) = F(x') = 0: no 0/0
    fx, fp = torch.zeros(3), torch.tensor([1e30, 1e6, 0.0])
    s = dr_fim(fx, fp, 0.5, gamma=1.0, prior_precision=1.0)
    assert torch.isfinite(s).all()
    # bounded by exp(-eps) * tau^2 * |Fx - Fx'| since min(L_x, L_x') >= tau^-2
    assert (s <= math.exp(-0.5) * (fp - fx).abs() * (1 + 1e-6)).all()
    # without the prior the same ratio explodes: the floor is what keeps it finite
    assert dr_fim(fx, fp, 0.5, prior_precision=0.0, eps=1e-8)[1] > 1e13


def test_perturbation_off_reduces_dr_fim_to_the_fisher():
    fx = torch.rand(100)
    assert torch.equal(dr_fim(fx, fx.clone(), 0.7), fx)
    assert torch.equal(top_k_first(dr_fim(fx, fx.clone(), 0.7), 10), top_k_first(fx, 10))


def test_growth_ratio_and_top_k_ties():
    assert growth_ratio(1, 2, 0.01, 0.05, 3, 8) == 0.0
    assert growth_ratio(2, 2, 0.01, 0.05, 3, 8) == pytest.approx(0.01)
    assert growth_ratio(5, 2, 0.01, 0.05, 3, 8) == pytest.approx(0.05 - 0.04 * math.exp(-1))
    assert growth_ratio(8, 2, 0.01, 0.05, 3, 8) == 0.05
    s = torch.tensor([1.0, 3.0, 1.0, 1.0, -math.inf, 2.0])
    assert top_k_first(s, 3).tolist() == [True, True, False, False, False, True]  # tie: lowest index
    assert int(top_k_first(s, 10).sum()) == 5  # never picks -inf (already selected)
    assert apportion(10, [1, 1, 1]) == [4, 3, 3] and sum(apportion(7, [5, 3, 9])) == 7


def test_kind_counts_split_fused_qkv():
    mask = torch.zeros(12, 4, dtype=torch.bool)
    mask[0, 0] = mask[5, 1] = mask[9] = True  # q row 0, k row 5, v row 9 (C = 4)
    assert kind_counts("blocks.3.attn.qkv.weight", mask) == {"q": 1, "k": 1, "v": 4}
    one = torch.ones(3, dtype=torch.bool)
    assert kind_counts("blocks.0.attn.q_proj.weight", one) == {"q": 3}
    assert kind_counts("blocks.0.mlp.fc1_g.weight", one) == {"fc1": 3}
    assert kind_counts("blocks.0.norm2.bias", one) == {"norm": 3}
    assert kind_counts("blocks.0.attn.proj.weight", one) == {"proj": 3}
    assert kind_counts("blocks.0.ls1.gamma", one) == {"other": 3}


def test_perturbation_redraws_patch_statistics_and_keeps_prefix():
    torch.manual_seed(0)
    hook = ChannelStatPerturbation([1], scale=1.0, num_prefix_tokens=2)
    x = torch.randn(4, 2 + 10, 8)
    assert hook(x, 1) is x  # inactive outside `active()`
    with hook.active(seed=3):
        y = hook(x, 1)
        assert hook(x, 0) is x  # not an insertion point
    with hook.active(seed=3):
        y2 = hook(x, 1)
    assert torch.equal(y, y2)  # seeded draws: identical again (resume)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])
    # normalised patch tokens are unchanged: only mean and std moved
    norm = lambda t: (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True, unbiased=False)  # noqa: E731
    assert torch.allclose(norm(y[:, 2:]), norm(x[:, 2:]), atol=1e-4)
    e_mu, e_sigma = hook.magnitudes().tolist()
    assert 0.2 < e_mu < 2 and 0.2 < e_sigma < 2  # mean |z| of a normal is 0.8


@pytest.mark.parametrize("mode", ["clamp", "log"])
def test_the_perturbed_std_never_flips_a_channel(mode):
    """Issue 27 (5): at s = 7 DSU's linear draw makes ~10 % of the stds negative (the channel flips sign); ``clamp``
    holds them at 0 and leaves every other value as the linear draw made it, ``log`` draws σ′ = σ·exp(z·s·Σ_log σ) > 0."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32) * torch.rand(8, 1, 32) * 3  # stds spread over the batch
    sigma = x.var(1, unbiased=False).add(1e-6).sqrt()

    def new_sigma(hook):
        with hook.active(seed=5):
            y = hook(x, 0)
        return y.var(1, unbiased=False).add(1e-6).sqrt(), (y - y.mean(1, keepdim=True)) * (
            x - x.mean(1, keepdim=True)
        )

    g = torch.Generator().manual_seed(5)  # the hook's draws: z_mu, then z_sigma
    torch.randn(8, 1, 32, generator=g)
    z = torch.randn(8, 1, 32, generator=g)[:, 0]
    spread = (sigma.var(0, keepdim=True) + 1e-6).sqrt()
    assert ((sigma + 7.0 * z * spread) < 0).float().mean() > 0.05  # what the linear draw alone would flip
    hook = ChannelStatPerturbation([0], scale=0.0, scale_sigma=7.0, sigma=mode)
    got, corr = new_sigma(hook)
    # a flipped channel anti-correlates with the clean one; none may
    assert (corr.sum(1) >= -1e-4).all()
    if mode == "log":
        assert (got > 0).all()
    else:
        assert (got >= 0).all() and ((got < 1e-2).float().mean() > 0.03)  # some clamped to 0 at this scale
    with pytest.raises(ValueError, match="use clamp or log"):
        ChannelStatPerturbation([0], sigma="abs")


def test_selected_adamw_matches_torch_adamw_when_everything_is_selected():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    mine = SelectedAdamW({"w": b}, lr=1e-2, weight_decay=0.1)
    assert isinstance(mine, torch.optim.Optimizer)
    mine.add("w", torch.arange(30))
    for i in range(5):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        mine.step()
        if i == 2:  # a save / load round trip mid-way (as Lightning does on resume) changes nothing
            sd = mine.state_dict()
            mine = SelectedAdamW({"w": b}, lr=1e-2, weight_decay=0.1)
            mine.load_state_dict(sd)
            assert mine.index("w").dtype == torch.int64
    assert torch.allclose(a, b, atol=1e-6)
    # a subset: the others are never written, even with weight decay
    c = torch.nn.Parameter(torch.randn(10))
    before = c.detach().clone()
    opt = SelectedAdamW({"c": c}, lr=0.1, weight_decay=0.5)
    opt.add("c", torch.tensor([2, 7]))
    c.grad = torch.ones(10)
    opt.step()
    changed = (c.detach() != before).nonzero().squeeze(1).tolist()
    assert changed == [2, 7]
    opt.retain("c", torch.tensor([True, False]))  # deselect element 7: back to its value at selection
    assert c[7].item() == before[7].item() and opt.index("c").tolist() == [2]


# -------------------------------------------------------------------------------------- the estimator
def test_fisher_estimate_is_the_mean_of_squared_batch_gradients(tmp_path):
    """A known loss, linear in the parameters with batch-dependent slopes: its gradient is the slope."""
    torch.manual_seed(0)
    m = fishertune(fisher=dict(window=None, ema_decay=None), schedule={**SCHED, "growth_end": 50})
    slopes, base = [], {n: torch.randn_like(p) for n, p in m.candidates.items()}

    def known_loss(images, labels):
        a = float(images.mean())  # differs per batch
        if m.schedule.is_stat_step(m.global_step) and not m.perturbation.enabled:
            slopes.append(a)
        head = sum(0 * p.sum() for p in m.head.parameters())  # the warm-up trains the head only
        loss = head + sum((a * base[n] * p).sum() for n, p in m.candidates.items())
        return None, {"known": loss}, loss

    m.fisher_forward = known_loss
    trainer(tmp_path, steps=6).fit(m, make_dm())
    assert (
        len(slopes) == 5 == m.stats.counts["x"]
    )  # steps 1..5: the warm-up's last refresh_every steps (1, 2) too
    est = m.stats.estimates("x")
    for n in m.candidates:
        want = torch.stack([(a * base[n]) ** 2 for a in slopes]).mean(0)
        assert torch.allclose(est[n], want, rtol=1e-5), n


def test_ema_estimate_matches_the_bias_corrected_recursion():
    m = fishertune(fisher=dict(ema_decay=0.9))
    name, p = next(iter(m.candidates.items()))
    gs = [torch.randn_like(p) for _ in range(3)]
    for g in gs:
        m.stats.accumulate("x", {name: g.clone()})
    f = torch.zeros_like(p)
    for g in gs:
        f = 0.9 * f + 0.1 * g**2
    assert torch.allclose(m.stats.estimates("x")[name], f / (1 - 0.9**3), rtol=1e-5)


# -------------------------------------------------------------------------------------- selection
def test_global_ranking_follows_the_scores_across_blocks():
    m = fishertune()
    m.masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in m.candidates.items()}
    scores = {n: (torch.rand_like(p) + 1 if n.startswith("blocks.1.") else torch.rand_like(p))
              for n, p in m.candidates.items()}  # fmt: skip
    block1 = sum(p.numel() for n, p in m.candidates.items() if n.startswith("blocks.1."))
    chosen = m.select(dict(scores), block1 // 2)
    assert sum(len(i) for i in chosen.values()) == block1 // 2
    assert all(len(i) == 0 for n, i in chosen.items() if not n.startswith("blocks.1."))
    # per-block budgets: each block gets its share whatever the scores
    m.options.selection.scope = "per_block"
    chosen = m.select(dict(scores), 1000)
    per_block = {b: sum(len(i) for n, i in chosen.items() if n.startswith(f"blocks.{b}.")) for b in (0, 1)}
    assert per_block[0] > 400 and per_block[1] > 400 and sum(len(i) for i in chosen.values()) == 1000
    # rows: whole rows of 2-d tensors, the budget met to within one row
    m.options.selection.scope, m.options.selection.granularity = "global", "row"
    chosen = m.select(dict(scores), 1000)
    n_sel = sum(len(i) for i in chosen.values())
    assert 1000 - 32 < n_sel <= 1000
    for n, idx in chosen.items():
        p = m.candidates[n]
        if p.ndim == 2 and len(idx):
            rows = torch.zeros(p.numel(), dtype=torch.bool)
            rows[idx] = True
            rows = rows.view_as(p)
            assert (rows.all(1) | ~rows.any(1)).all()


def test_bad_options_get_one_line_errors():
    with pytest.raises(ConfigError, match=r"method.fishertune.selection.scope='layer' is not supported"):
        fishertune(selection=dict(scope="layer"))
    with pytest.raises(ConfigError, match="does not fit the .* candidate elements"):
        fishertune(schedule={**SCHED, "budget": 10**9})
    with pytest.raises(ConfigError, match="warmup_iters <= growth_end"):
        fishertune(schedule={**SCHED, "warmup_iters": 9})


# -------------------------------------------------------------------------------------- training
class Watch(pl.Callback):
    """Records the state at the start of every step: backbone snapshot at T1, masks at each refresh."""

    def __init__(self):
        self.at_t1, self.masks = None, {}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        t = m.global_step
        if t == m.options.schedule.warmup_iters:
            self.at_t1 = (snapshot(m.backbone), dict(m.stats.counts))

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        t = m.global_step - 1
        if m.schedule.is_refresh(t):
            self.masks[t] = {n: k.clone() for n, k in m.masks.items()}


def test_training_moves_only_the_scheduled_selection(tmp_path):
    torch.manual_seed(0)
    m = fishertune()
    pretrained, head0 = snapshot(m.backbone), snapshot(m.head)
    watch = Watch()
    trainer(tmp_path, steps=12, callbacks=[watch]).fit(m, make_dm())
    # warm-up: no backbone element moved, the head trained; its last `window` steps (1, 2) gather statistics for
    # the first selection (step 1 done when step T1 = 2 starts), so it rests on a window like every later one
    bb_t1, counts_t1 = watch.at_t1
    assert all(torch.equal(bb_t1[k], pretrained[k]) for k in pretrained)
    assert counts_t1 == {"x": 1, "p": 1, "eps": 1} and m.schedule.stats_start() == 1
    # the schedule at each refresh, non-decreasing, nested masks
    assert [h["step"] for h in m.history] == [2, 4, 6, 8]
    for h in m.history:
        assert h["selected"] == h["target"] == m.schedule.k_target(h["step"])
    steps = sorted(watch.masks)
    for a, b in zip(steps, steps[1:]):
        assert all((watch.masks[a][n] <= watch.masks[b][n]).all() for n in m.candidates)
    k_final = round(0.05 * m.n_base)
    assert m.selected_opt.num_selected() == k_final
    # every unselected element bit-identical; selected ones moved; excluded tensors untouched
    changed = 0
    for name, p in m.backbone.model.named_parameters():
        now, before = p.detach(), pretrained[f"model.{name}"]
        if name not in m.candidates:
            assert torch.equal(now, before), name
            continue
        diff = now != before
        assert not (diff & ~m.masks[name]).any(), name
        changed += int(diff.sum())
    assert k_final - 5 <= changed <= k_final  # an element whose gradient is exactly 0 may stay put
    assert all(not torch.equal(v, head0[k]) for k, v in snapshot(m.head).items())
    assert m.stats.fisher == {} and m.final  # statistics freed after the last refresh
    assert all(not p.requires_grad for n, p in m.candidates.items() if not m.masks[n].any())
    assert (tmp_path / "fishertune_mask.pt").is_file() and (tmp_path / "fishertune_selection.csv").is_file()
    saved = torch.load(tmp_path / "fishertune_mask.pt")
    assert sum(len(v) for v in saved["index"].values()) == k_final


@pytest.mark.parametrize("experiment", ["fishertune", "gta2cbm/fishertune_clip_l"])
def test_the_paper_recipes_select_15_2m_elements_of_a_vit_l(compose_cfg, experiment):
    """The paper's budget: 15.21M trainable elements = 5 % of a 304.2M ViT-L, for DINOv2-L and CLIP-L alike. Built
    as dgss-train builds the recipe (full size, on the meta device: no memory, no weights); ``budget`` pins the
    count exactly where the backbone's size differs from 304.2M."""
    cfg = compose_cfg([f"experiment={experiment}", "backbone.weights=null", "trainer=cpu"])
    with torch.device("meta"):
        m = build_method(cfg)
    end = m.options.schedule.growth_end
    assert m.backbone.num_blocks == 24 and m.backbone.embed_dim == 1024
    assert m.n_base == pytest.approx(304.2e6, rel=0.002) and m.schedule.k_target(end) == pytest.approx(
        15.21e6, rel=0.002
    )
    assert m.schedule.k_target(m.options.schedule.warmup_iters - 1) == 0
    with torch.device("meta"):
        pinned = build_method(compose_cfg([f"experiment={experiment}", "backbone.weights=null", "trainer=cpu",
                                           "method.fishertune.schedule.budget=15210000"]))  # fmt: skip
    assert pinned.schedule.k_target(end) == pinned.schedule.k_target(end + 1000) == 15_210_000


# ---------------------------------------------------------------------- families, sparse checkpoints
FT_SMALL = ["method=fishertune", "method.fishertune.schedule.warmup_iters=1", "method.fishertune.schedule.growth_end=3",
            "method.fishertune.schedule.refresh_every=1", "method.fishertune.schedule.growth_tau=2", "method.fishertune.fisher.window=1",
            "method.fishertune.perturb.after_blocks=[0,1]"]  # fmt: skip


@pytest.mark.parametrize("backbone", ["toy", "eva02_l", "samvit_b", "clip_l"])
def test_trains_and_evaluates_on_every_family(compose_cfg, tmp_path, backbone):
    cfg = compose_cfg([f"backbone={backbone}", "debug=tiny", "trainer.max_steps=4", "trainer.val_check_interval=4",
                       "synthetic.val_length=2", "callbacks=minimal", "~logger", *FT_SMALL])  # fmt: skip
    metrics = train(cfg)
    assert "val/mean_mIoU" in metrics and math.isfinite(metrics["train/loss"])
    saved = torch.load(tmp_path / "fishertune_mask.pt")
    assert [h["step"] for h in saved["history"]] == [1, 2, 3]
    n_base = sum(math.prod(s) for s in saved["shapes"].values())  # candidates; the base adds the embeddings
    assert 0.04 * n_base < saved["history"][-1]["selected"] == sum(len(i) for i in saved["index"].values())
    assert sum(r["selected"] for r in saved["breakdown"]) == saved["history"][-1]["selected"]
    # every module kind of the family is recognised (fused qkv split, EVA's q/k/v_proj and SwiGLU, SAM's blocks)
    m = build_method(cfg)
    kinds = set()
    for name, p in m.candidates.items():
        if name.startswith("blocks."):
            kinds |= set(kind_counts(name, torch.ones_like(p, dtype=torch.bool)))
    assert {"q", "k", "v", "proj", "fc1", "fc2", "norm"} <= kinds


def test_sparse_checkpoint_round_trip_reproduces_validation(compose_cfg, tmp_path):
    m = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=64, depth=2, embed_dim=64,
                          num_heads=2, patch_size=16)  # fmt: skip
    weights = tmp_path / "pretrained.pth"
    torch.save(m.state_dict(), weights)
    from helpers.runs import backbone_args

    run = [x for x in RUN if not x.startswith("trainer.max_steps") and not x.startswith("trainer.val_check")]
    cfg = compose_cfg([*DATA, *run, *backbone_args(weights), "trainer.max_steps=5", "trainer.val_check_interval=5",
                       *FT_SMALL])  # fmt: skip
    metrics = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])  # the backbone lives in the delta
    delta = section(ckpt, "fishertune")["delta"]
    n_delta = sum(len(d["index"]) for d in delta.values())
    total = sum(p.numel() for p in m.parameters())
    assert 0 < n_delta <= 0.05 * total + 1
    ecfg = compose_cfg(
        [f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "trainer=cpu"], config_name="eval"
    )
    again = evaluate(ecfg)
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/fog/mIoU"):
        assert again[k] == metrics[k], k
    # merged with the backbone into one file (dgss-merge), it evaluates without the weights file
    from dgss.restore import merge

    merge(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "merged.ckpt")
    weights.unlink()
    again = evaluate(
        compose_cfg([f"ckpt_path={tmp_path / 'merged.ckpt'}", "trainer=cpu"], config_name="eval")
    )
    assert again["val/mean_mIoU"] == metrics["val/mean_mIoU"]


@pytest.mark.parametrize("normalize", ["quantile", "per_tensor", "mean", "none"])
def test_scores_use_both_estimates_in_the_clean_estimates_unit(normalize):
    """DR-FIM of both estimates divided by the unit of the clean one: its 0.9-quantile over all candidates
    (numpy's, on the values), per tensor, its mean, or 1; ``fim`` is the first term alone."""
    import numpy as np

    torch.manual_seed(0)
    m = fishertune(fisher=dict(gamma=2.0, prior_precision=0.5, normalize=normalize, quantile=0.9))
    for _ in range(2):
        m.stats.accumulate("x", {n: torch.randn_like(p) for n, p in m.candidates.items()})
        m.stats.accumulate(
            "p", {n: 2 * torch.randn_like(p) for n, p in m.candidates.items() if "blocks.1." in n}
        )
    m.stats.eps_ema, m.stats.counts["eps"] = (
        torch.tensor([0.008, 0.004]),
        1,
    )  # EMA (0.99) after one update of (0.8, 0.4)
    fx, fp = m.stats.estimates("x"), m.stats.estimates("p")
    allv = np.concatenate([v.reshape(-1).numpy() for v in fx.values()])
    unit = {
        "quantile": {n: float(np.quantile(allv, 0.9, method="inverted_cdf")) for n in fx},
        "per_tensor": {n: float(np.quantile(v.reshape(-1).numpy(), 0.9, method="inverted_cdf")) for n, v in fx.items()},
        "mean": {n: float(allv.astype(np.float64).mean()) for n in fx},
        "none": dict.fromkeys(fx, 1.0),
    }[normalize]  # fmt: skip
    got = m.scores()
    for n in m.candidates:
        want = dr_fim(fx[n] / unit[n], fp[n] / unit[n], 1.2, gamma=2.0, prior_precision=0.5)
        assert torch.allclose(got[n], want, rtol=1e-5), n
    m.score = FimScore(m.options.fisher)  # the score strategy of fisher.score=fim
    got = m.scores()
    assert all(torch.allclose(got[n], fx[n] / unit[n], rtol=1e-5) for n in m.candidates)


def test_the_quantile_unit_ignores_outliers_the_mean_follows():
    """Most Fisher mass in a few elements (as measured on the demo: 20 LayerScale elements held 76 %): the mean
    moves with them, the 0.95-quantile does not, so the domain term keeps its scale at the selection boundary."""
    from dgss.methods.fishertune import fisher_scale

    torch.manual_seed(0)
    body = {"a": torch.rand(10_000), "b": torch.rand(5_000)}
    spiky = {"a": body["a"].clone(), "b": body["b"].clone()}
    spiky["b"][:20] = 1e5
    q = fisher_scale(body, "quantile", 0.95)["a"]
    assert fisher_scale(spiky, "quantile", 0.95)["a"] == pytest.approx(q, rel=0.01)
    assert fisher_scale(spiky, "mean", 0.95)["a"] > 100 * fisher_scale(body, "mean", 0.95)["a"]
    zero = {"a": torch.zeros(1000)}
    zero["a"][:10] = 2.0  # 99 % without gradient: the unit falls back to the non-zero mean
    assert fisher_scale(zero, "quantile", 0.95)["a"] == 2.0


def test_selection_digest_is_exact_where_a_float32_sum_is_not():
    """The old check compared float32(Σ indices): equal for {0, 3} and {1, 2}, and for sums 2²⁴ and 2²⁴ + 1."""
    from dgss.methods.fishertune import selection_digest

    a, b = [torch.tensor([0, 3])], [torch.tensor([1, 2])]
    assert float(torch.tensor(float(a[0].sum()))) == float(torch.tensor(float(b[0].sum())))
    assert not torch.equal(selection_digest(a), selection_digest(b))
    big, bigger = [torch.tensor([16_777_216])], [torch.tensor([16_777_217])]
    assert torch.tensor(16_777_216.0) == torch.tensor(float(16_777_217), dtype=torch.float32)
    assert not torch.equal(selection_digest(big), selection_digest(bigger))
    moved = [torch.tensor([0]), torch.tensor([3])]  # the same indices in another tensor
    assert not torch.equal(selection_digest([torch.tensor([0, 3]), torch.tensor([], dtype=torch.long)]),
                           selection_digest(moved))  # fmt: skip
    assert torch.equal(selection_digest(a), selection_digest([t.clone() for t in a]))


def test_nonfinite_losses_skip_without_poisoning_the_statistics(tmp_path):
    torch.manual_seed(0)
    m = fishertune(schedule={**SCHED, "growth_end": 100})  # statistics kept to look at
    nan_on(m, lambda call: call in (4, 7))  # step 2's perturbed pass, and a clean pass
    with pytest.warns(UserWarning, match="non-finite loss at step"):
        t = trainer(tmp_path, steps=6)
        t.fit(m, make_dm())
    assert t.global_step == 6 and m.nonfinite["total"] == 2
    for which in ("x", "p"):
        assert all(torch.isfinite(v).all() for v in m.stats.fisher[which].values()), which
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_step_whose_clean_pass_is_nonfinite_leaves_every_statistic_bit_identical(tmp_path):
    """Step 2 is a statistic step: its perturbed pass is finite, its clean pass NaN. Nothing of it may enter the
    Fisher estimates, the perturbation magnitudes or the counts (nor the weights and Adam moments)."""
    torch.manual_seed(0)
    m = fishertune(schedule={**SCHED, "growth_end": 100})
    assert m.schedule.is_stat_step(2)
    seen = {}
    nan_on(m, lambda call: call == 4)  # step 2 makes calls 3 (perturbed) and 4 (clean); steps 0, 1 one each

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[batch_idx] = {
                "fisher": {w: {n: v.clone() for n, v in d.items()} for w, d in pl_module.stats.fisher.items()},
                "eps": pl_module.stats.eps_ema.clone(), "counts": dict(pl_module.stats.counts),
                "weights": snapshot(pl_module),
                "adam": {id(p): {k: v.clone() for k, v in st.items()} for p, st in pl_module.selected_opt.state.items()},
            }  # fmt: skip

    with pytest.warns(UserWarning, match="non-finite loss at step 2"):
        trainer(tmp_path, steps=4, callbacks=[Look()], limit_val_batches=0).fit(m, make_dm())
    before, after = seen[1], seen[2]
    assert after["counts"] == before["counts"] and torch.equal(after["eps"], before["eps"])
    assert after["fisher"].keys() == before["fisher"].keys()
    for w in before["fisher"]:
        for n, v in before["fisher"][w].items():
            assert torch.equal(v, after["fisher"][w][n]), (w, n)
    for k, v in before["weights"].items():
        assert torch.equal(v, after["weights"][k]), k
    for n, st in before["adam"].items():
        assert all(torch.equal(v, after["adam"][n][k]) for k, v in st.items()), n
    assert seen[3]["counts"]["p"] == before["counts"]["p"] + 1  # step 3 (statistics) goes through


# ------------------------------------------------------------------ the domain term, end to end (issue 18)
class Masks(pl.Callback):
    def __init__(self):
        self.at = {}

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        t = m.global_step - 1
        if m.schedule.is_refresh(t):
            self.at[t] = {n: k.clone() for n, k in m.masks.items()}


def _run(tmp_path, steps=9, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = fishertune(**kw)
    cb = Masks()
    trainer(tmp_path, steps=steps, callbacks=[cb]).fit(m, make_dm())
    return m, cb.at


def test_with_the_perturbation_off_dr_fim_selects_exactly_what_fim_selects(tmp_path):
    """x′ = x (perturb.scale = 0): both passes run from the same RNG state (the light head's dropout draws the same
    masks), so F(x′) = F(x) bit for bit, the domain term is 0, and every refresh selects what the Fisher alone
    selects; the training stream is the same run."""
    sched = {**SCHED, "growth_end": 100}  # statistics kept to compare
    dr, dr_masks = _run(tmp_path / "dr", schedule=sched, perturb=dict(after_blocks=[0], scale=0.0))
    fim, fim_masks = _run(tmp_path / "fim", schedule=sched, fisher=dict(window=2, score="fim"))
    for n in dr.candidates:
        assert torch.equal(dr.stats.fisher["x"][n], dr.stats.fisher["p"][n]), n
    assert float(dr.stats.eps_ema.abs().sum()) == 0.0
    assert dr_masks.keys() == fim_masks.keys() == {2, 4, 6, 8}
    for t in dr_masks:
        assert all(torch.equal(dr_masks[t][n], fim_masks[t][n]) for n in dr.candidates), t
    assert all(torch.equal(a, b) for a, b in zip(dr.state_dict().values(), fim.state_dict().values()))


def test_the_statistics_pass_leaves_the_training_stream_and_running_statistics_alone(tmp_path):
    """With the perturbation on, up to T1 (nothing selected yet) a DR-FIM run trains its head exactly as a
    FIM-only run (no perturbed pass): same dropout masks, same batch-norm running statistics."""
    sched = {**SCHED, "warmup_iters": 4}
    dr, _ = _run(tmp_path / "dr", steps=4, schedule=sched)
    fim, _ = _run(tmp_path / "fim", steps=4, schedule=sched, fisher=dict(window=2, score="fim"))
    assert dr.stats.counts["p"] == 1 and fim.stats.counts["p"] == 0  # step 3: the window before T1 = 4 began
    for (k, a), b in zip(dr.head.state_dict().items(), fim.head.state_dict().values()):
        assert torch.equal(a, b), k


def test_dr_fim_and_fim_differ_with_the_perturbation_on(tmp_path):
    dr, dr_masks = _run(tmp_path / "dr")
    fim, fim_masks = _run(tmp_path / "fim", fisher=dict(window=2, score="fim"))
    first = min(dr_masks)
    differ = sum(int((dr_masks[first][n] & ~fim_masks[first][n]).sum()) for n in dr.candidates)
    assert differ > 0


def test_random_selection_keeps_budget_and_schedule_without_statistics(tmp_path):
    m, masks = _run(tmp_path, fisher=dict(window=2, score="random"))
    assert m.stats.counts == {"x": 0, "p": 0, "eps": 0} and m.schedule.stats_start() == SCHED["warmup_iters"]
    assert [h["selected"] for h in m.history] == [m.schedule.k_target(t) for t in (2, 4, 6, 8)]
    # uniform: the final selection's share per tensor follows the tensor's size (within sampling noise)
    sel = {n: int(k.sum()) for n, k in m.masks.items()}
    total = sum(sel.values())
    sizes = {n: p.numel() for n, p in m.candidates.items()}
    big = max(sizes, key=sizes.get)
    assert abs(sel[big] / total - sizes[big] / sum(sizes.values())) < 0.05


def test_one_image_per_rank_warns_that_the_domain_term_is_zero(tmp_path):
    torch.manual_seed(0)
    m = fishertune()
    dm = make_dm()
    dm.batch_size = 1
    with pytest.warns(UserWarning, match="one image per rank"):
        trainer(tmp_path, steps=3).fit(m, dm)


def _mask2former_fishertune(**fisher):
    """A tiny DINOv2-reg + Mask2Former FisherTune whose one statistic step is T1 = 2 (window 1, plain mean)."""
    import functools

    from helpers.builders import H, W

    from dgss.models.backbone import Backbone
    from dgss.models.heads.mask2former import Mask2FormerHead

    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(H, W), out_indices=[0, 1, 2, 3],
                  model_kwargs=dict(depth=4, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    head = functools.partial(Mask2FormerHead, dim=32, num_queries=6, tiny=True, num_heads=4,
                             pyramid=[2.0, 1.0, 0.5, 0.25])  # fmt: skip
    m = FisherTune(bb, head, num_classes=19, fishertune=dict(schedule={**SCHED, "growth_end": 100},
                   perturb=dict(after_blocks=[0]), fisher=dict(window=1, ema_decay=None, **fisher)))  # fmt: skip
    m.configure_model()
    return m


def _statistic_step(tmp_path, **fisher):
    """Trains :func:`_mask2former_fishertune` 3 steps; returns it, and a fresh copy in eval mode with the weights
    and the batch of its statistic step (step 2) for a reference computation."""
    torch.manual_seed(0)
    m = _mask2former_fishertune(**fisher)
    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pl_module.global_step == 2:  # T1: the one statistic step (window 1)
                seen["batch"] = {k: [t.clone() if torch.is_tensor(t) else t for t in v] if isinstance(v, list) else v
                                 for k, v in batch.items()}  # fmt: skip
                seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    trainer(tmp_path, steps=3, callbacks=[Grab()]).fit(m, make_dm())
    assert m.stats.counts["x"] == 1
    ref = _mask2former_fishertune(**fisher)
    ref.load_state_dict(seen["state"])
    ref.eval()  # no dropout in this head: the prediction is deterministic
    for p in ref.candidates.values():
        p.requires_grad_(True)
    return m, ref, ref.prepare_batch(seen["batch"])


def _pixel_nll(ref, images, labels):
    """The per-pixel log-likelihood loss of Mask2Former's class-normalised semantic scores, written out."""
    scores = ref.head.logits(ref(images), labels.shape[-2:])
    logp = (scores / scores.sum(1, keepdim=True)).log()
    return torch.nn.functional.nll_loss(logp, labels.long(), ignore_index=255)


def test_pixel_ce_fisher_is_the_squared_gradient_of_the_pixel_log_likelihood(tmp_path):
    """fisher.loss: pixel_ce takes F of the per-pixel log-likelihood of the head's semantic prediction, not of the
    training loss: with Mask2Former (set losses for training) the log of the class-normalised scores. Checked
    against autograd on the same batch, weights and random state."""
    m, ref, (images, labels) = _statistic_step(tmp_path, loss="pixel_ce")
    params = list(ref.candidates.values())
    nll = _pixel_nll(ref, images, labels)
    grads = torch.autograd.grad(nll, params, allow_unused=True)
    train = sum(ref.head.loss(ref.head(ref.backbone(images)), labels).values())
    g_train = torch.autograd.grad(train, params, allow_unused=True)
    differs = False
    for (n, p), g, gt in zip(ref.candidates.items(), grads, g_train):
        g = torch.zeros_like(p) if g is None else g
        assert torch.allclose(m.stats.fisher["x"][n], g**2, rtol=1e-3, atol=1e-10), n
        differs |= gt is not None and not torch.allclose(gt**2, g**2, rtol=1e-2)
    assert differs  # the training loss would have given other statistics


def test_per_sample_fisher_is_the_mean_of_each_images_own_squared_gradient(tmp_path):
    """fisher.per_sample: F(x) = (1/B) Σ_i g_i², g_i the gradient of image i's loss with image i alone in the batch
    (the reference runs a separate forward per image), not the square of the batch's gradient."""
    m, ref, (images, labels) = _statistic_step(tmp_path, loss="pixel_ce", per_sample=True)
    params = list(ref.candidates.values())
    b = len(images)
    assert b > 1
    want = [torch.zeros_like(p) for p in params]
    for i in range(b):
        grads = torch.autograd.grad(
            _pixel_nll(ref, images[i : i + 1], labels[i : i + 1]), params, allow_unused=True
        )
        for w, g in zip(want, grads):
            if g is not None:
                w.add_(g**2 / b)
    batch = torch.autograd.grad(_pixel_nll(ref, images, labels), params, allow_unused=True)
    differs = False
    for n, w, g in zip(ref.candidates, want, batch):
        assert torch.allclose(m.stats.fisher["x"][n], w, rtol=1e-3, atol=1e-10), n
        differs |= g is not None and not torch.allclose(g**2, w, rtol=1e-2)
    assert differs  # the batch gradient's square is another statistic


def test_per_sample_statistics_leave_the_training_stream_alone(tmp_path):
    """Per-image losses are extra backward passes from a forked random stream: up to T1 a per-sample DR-FIM run
    trains its head exactly as a batch-gradient one, and both of its estimates are filled."""
    sched = {**SCHED, "warmup_iters": 4}
    ps, _ = _run(tmp_path / "ps", steps=4, schedule=sched, fisher=dict(window=2, per_sample=True))
    batch, _ = _run(tmp_path / "batch", steps=4, schedule=sched)
    assert ps.stats.counts == batch.stats.counts and ps.stats.counts["p"] == 1
    for (k, a), b in zip(ps.head.state_dict().items(), batch.head.state_dict().values()):
        assert torch.equal(a, b), k
    for w in ("x", "p"):
        assert any(
            not torch.allclose(ps.stats.fisher[w][n], batch.stats.fisher[w][n], rtol=1e-2, atol=0)
            for n in ps.candidates
        ), w


def test_selected_adamw_keeps_int64_indices_through_a_state_dict_round_trip():
    """torch's loader casts state to the parameter's dtype; an index beyond 2**24 must survive exactly."""
    big = torch.nn.Parameter(torch.zeros(1 << 25))
    opt = SelectedAdamW({"big": big}, lr=0.1)
    opt.add("big", torch.tensor([(1 << 24) + 1, (1 << 25) - 1]))
    big.grad = torch.ones_like(big)
    opt.step()
    fresh = SelectedAdamW({"big": big}, lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.index("big").tolist() == [(1 << 24) + 1, (1 << 25) - 1]
    assert fresh.param_groups[0]["name"] == "backbone_selected"


def test_chained_optimizer_steps_as_its_members_and_round_trips_their_state():
    """The one optimizer Lightning steps: bit for bit what the head's AdamW and SelectedAdamW do apart (each under its
    own poly schedule), through a state_dict round trip mid-way (SelectedAdamW's int64 indices kept)."""
    from dgss.methods.chained_optimizer import ChainedOptimizer

    torch.manual_seed(0)
    head0, cand0 = torch.randn(4, 3), torch.randn(50)
    grads = [(torch.randn(4, 3), torch.randn(50)) for _ in range(6)]

    def build(head, cand):
        adamw = torch.optim.AdamW([{"params": [head], "lr": 1e-2, "weight_decay": 0.05}], lr=1e-2)
        sel = SelectedAdamW({"c": cand}, lr=1e-3, weight_decay=0.1)
        sel.add("c", torch.tensor([3, 17, 40]))
        return adamw, sel

    def params():
        return torch.nn.Parameter(head0.clone()), torch.nn.Parameter(cand0.clone())

    poly = lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=0.9)  # noqa: E731
    h1, c1 = params()
    apart = build(h1, c1)
    scheds = [poly(o) for o in apart]
    h2, c2 = params()
    chain = ChainedOptimizer(*build(h2, c2))
    sched = poly(chain)
    assert chain.defaults["lr"] == 1e-2 and len(chain.param_groups) == 2
    for i, (gh, gc) in enumerate(grads):
        h1.grad, c1.grad, h2.grad, c2.grad = gh.clone(), gc.clone(), gh.clone(), gc.clone()
        for o, sc in zip(apart, scheds):
            o.step()
            sc.step()
        chain.step()
        sched.step()
        chain.zero_grad()
        assert h2.grad is None and c2.grad is None  # zero_grad reaches every member
        if (
            i == 2
        ):  # what Lightning does on resume: a new chain over the same parameters loads the saved state
            sd, ssd = chain.state_dict(), sched.state_dict()
            chain = ChainedOptimizer(*build(h2, c2))
            chain.state[c2]["exp_avg"].fill_(9.0)  # overwritten by the load
            chain.load_state_dict(sd)
            sched = poly(chain)
            sched.load_state_dict(ssd)
            sel = chain.optimizers[1]
            assert sel.index("c").dtype == torch.int64 and sel.index("c").tolist() == [3, 17, 40]
            assert (
                chain.param_groups[0] is chain.optimizers[0].param_groups[0]
            )  # the members' dicts, not copies
            assert chain.state[h2] is chain.optimizers[0].state[h2] and len(chain.state) == 2
        assert [g["lr"] for g in chain.param_groups] == [g["lr"] for o in apart for g in o.param_groups]
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
    with pytest.raises(ValueError, match="more than one parameter group"):
        ChainedOptimizer(torch.optim.SGD([h1], lr=1.0), torch.optim.SGD([h1], lr=1.0))


def test_lightning_clipping_counts_only_selected_gradients(tmp_path):
    """trainer.gradient_clip_val applies to FisherTune like to every method, after the masking: at the optimizer
    step every unselected element's gradient is 0 and the clipped norm is at most the bound."""
    torch.manual_seed(0)
    m = fishertune()
    seen, step = [], m.selected_opt.step

    def look():
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        unselected = [float(p.grad[~m.masks[n]].abs().max()) for n, p in m.candidates.items()
                      if p.grad is not None and (~m.masks[n]).any()]  # fmt: skip
        seen.append((float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
                     max(unselected, default=0.0), m.selected_opt.num_selected()))  # fmt: skip
        return step()

    m.selected_opt.step = look
    trainer(tmp_path, steps=6, gradient_clip_val=1e-3, limit_val_batches=0).fit(m, make_dm())
    assert len(seen) == 6 and all(n <= 1e-3 * (1 + 1e-4) for n, _, _ in seen)
    grown = [u for _, u, k in seen if k]
    assert grown and max(grown) == 0.0  # from the first selection on, unselected gradients are zero


def test_grow_selection_fills_each_budget_with_the_best_units_and_keeps_the_old_ones():
    """The pure selection step on hand-made scores: global top-k; monotone keeps what is selected and adds the best
    of the rest; per-group budgets in proportion to size; whole rows at the row granularity."""
    from dgss.methods.fishertune import grow_selection

    def sc():
        return {"a": torch.tensor([[5.0, 1.0], [4.0, 0.0]]), "b": torch.tensor([3.0, 2.0, 6.0, -1.0])}

    empty = {"a": torch.zeros(2, 2, dtype=torch.bool), "b": torch.zeros(4, dtype=torch.bool)}
    got = grow_selection(sc(), empty, [["a", "b"]], 3)
    assert got["a"].tolist() == [0, 2] and got["b"].tolist() == [2]  # 6, 5, 4
    held = {"a": torch.tensor([[False, True], [False, False]]), "b": torch.zeros(4, dtype=torch.bool)}
    got = grow_selection(sc(), held, [["a", "b"]], 3)  # 1 already held: two more, the best of the rest
    assert got["a"].tolist() == [0] and got["b"].tolist() == [2]
    got = grow_selection(sc(), empty, [["a"], ["b"]], 4)  # budgets 2 + 2 by size
    assert got["a"].tolist() == [0, 2] and got["b"].tolist() == [0, 2]
    got = grow_selection(sc(), empty, [["a", "b"]], 3, granularity="row")  # a's rows: means 3.0 (size 2), 2.0
    assert got["a"].tolist() == [0, 1] and got["b"].tolist() == [
        2
    ]  # 6 (1), then a's first row (2): budget 3 met
    got = grow_selection(
        sc(), empty, [["a", "b"]], 2, granularity="row"
    )  # the row would overflow: stop there
    assert got["a"].tolist() == [] and got["b"].tolist() == [2]
    got = grow_selection(sc(), held, [["a", "b"]], 2, monotone=False)
    assert got["a"].tolist() == [0] and got["b"].tolist() == [2]


def test_accumulate_squares_is_the_ema_or_the_running_sum_of_scaled_squares():
    from dgss.methods.fishertune import accumulate_squares

    gs = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])]
    ema, total = {}, {}
    for g in gs:
        accumulate_squares(ema, {"w": g}, 0.9, scale=2.0)
        accumulate_squares(total, {"w": g}, None, scale=2.0)
    want = 0.9 * (0.1 * (2 * gs[0]) ** 2) + 0.1 * (2 * gs[1]) ** 2
    assert torch.allclose(ema["w"], want) and torch.allclose(total["w"], (2 * gs[0]) ** 2 + (2 * gs[1]) ** 2)


def test_a_good_step_ends_the_nonfinite_streak(tmp_path):
    """max_nonfinite counts non-finite steps *in a row*: NaN at steps 0, 2, 4, 6 with max_nonfinite=2 must not
    abort (each good step in between ends the streak in the base's on_before_optimizer_step, which FisherTune's
    extends), and every skipped step restores the running statistics of its own start."""
    torch.manual_seed(0)
    m = fishertune(max_nonfinite=2)
    seen = {}
    nan_on(m, lambda call: m.global_step % 2 == 0 and m.global_step < 8)

    class Look(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[pl_module.global_step] = [b.clone() for b in running_buffers(pl_module)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = pl_module.global_step - 1
            if t % 2 == 0 and t < 8:  # a skipped step: its buffers are those of its own start
                assert all(torch.equal(a, b) for a, b in zip(running_buffers(pl_module), seen[t]))

    with pytest.warns(UserWarning, match="non-finite loss at step"):
        trainer(tmp_path, steps=9, callbacks=[Look()]).fit(m, make_dm())
    assert m.nonfinite["total"] == 4 and m.nonfinite["streak"] == 0
    assert not torch.equal(seen[8][0], seen[2][0])  # the good steps did update them


def test_a_fishertune_backbone_merges_to_a_plain_timm_model_and_reins_does_not():
    """FisherTune updates the backbone's own tensors; its perturbation hook is the identity outside the perturbed
    pass, so ``plain_backbone`` (dgss-merge --backbone-out) is the timm model with the trained values. Rein's
    refinement hook is part of its model: refused in one line."""
    from dgss.methods.rein import Rein

    m = fishertune()
    p = dict(m.backbone.model.named_parameters())["blocks.1.mlp.fc1.weight"]
    with torch.no_grad():
        p.add_(0.5)  # what a sparse update leaves in the backbone's own tensor
    plain = m.plain_backbone()
    got, want = plain.state_dict(), m.backbone.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["blocks.1.mlp.fc1.weight"].data_ptr() != p.data_ptr()  # a copy, not the training model
    with pytest.raises(ConfigError, match="method Rein adds modules to the backbone that do not fold"):
        make_method(Rein).plain_backbone()


def test_the_measured_scale_makes_the_perturbation_as_large_as_the_real_shift():
    """Issue 27 (5): ``scripts/measure_shift.py`` measures, scene by scene, how far the embedded targets move the
    channel means at the perturbed block, in the perturbation's units; the hook at that scale moves them as far on
    average (within sampling noise)."""
    from helpers.scripts import load_script

    ms = load_script("measure_shift")
    from dgss.data.synthetic import SyntheticDomain
    from dgss.models.backbone import Backbone

    torch.manual_seed(0)
    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 64),
                  model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)).eval()  # fmt: skip
    res = ms.measure(bb, [0], "game", ["fog"], batches=6, batch_size=4, height=32, width=64)
    s = res["fog"]["scale"]
    assert s > 0 and res["fog"]["scale_sigma"] > 0
    # the real shift at block 0 against the hook's at scale s, over the same source batches
    seen = {}
    handle = bb.register_block_hook(lambda x, i: seen.setdefault(i, x.detach().clone()) if i == 0 else x)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in bb.normalization)
    real, simulated = [], []
    hook = ChannelStatPerturbation([0], scale=s, num_prefix_tokens=bb.num_prefix_tokens, scale_sigma=0.0)
    with torch.no_grad():
        for k in range(6):
            toks = {}
            for d in ("game", "fog"):
                data = SyntheticDomain(d, "train", 24, 32, 64)
                x = torch.stack([data.load(4 * k + j)[0] for j in range(4)]).float() / 255
                seen.clear()
                bb((x - mean) / std)
                toks[d] = seen[0]
            mu_s, _ = ms.channel_stats(toks["game"], bb.num_prefix_tokens)
            mu_t, _ = ms.channel_stats(toks["fog"], bb.num_prefix_tokens)
            real.append((mu_t - mu_s).abs().mean())
            with hook.active(seed=k):
                mu_p, _ = ms.channel_stats(hook(toks["game"], 0), bb.num_prefix_tokens)
            simulated.append((mu_p - mu_s).abs().mean())
    handle.remove()
    ratio = float(torch.stack(simulated).mean() / torch.stack(real).mean())
    assert 0.8 < ratio < 1.25, ratio


def test_the_ablation_reports_paired_per_seed_differences():
    """Issue 27 (5): arms are bit-identical until the warm-up ends, so ``scripts/proxy_ablation.py`` reports each
    arm's per-seed differences from a baseline arm (mean ± std, seeds higher), not only unpaired means; its new arms
    (the measured perturbation scale, train_aug) are in its run table."""
    import doctest

    from helpers.scripts import load_script

    pa = load_script("proxy_ablation")
    assert doctest.testmod(pa).failed == 0
    d = pa.paired_differences({"fim": [40.0, 41.0], "dr": [39.0, 43.0], "rand": [40.0, 41.0]}, "fim")
    assert d["fim"] == (0.0, 0.0, 0) and d["rand"] == (0.0, 0.0, 0)
    assert d["dr"][0] == pytest.approx(0.5) and d["dr"][2] == 1
    assert {
        "fishertune dr_fim measured scale",
        "fishertune dr_fim train_aug",
        "fishertune dr_fim oracle",
    } <= set(pa.RUNS)


def test_the_paired_render_oracle_feeds_the_same_scenes_in_another_domain_as_x_prime(tmp_path):
    """Issue 27 (5), the oracle arm: with ``synthetic.paired=[fog]`` every training sample also carries its scene
    rendered in fog through the same augmentation draws (the batch's paired images equal a fog source's images for
    the same stream; the game images are those of an unpaired run), and ``perturb.type: paired_render`` takes them as
    x′ on statistic steps, with ε the real shift of the channel statistics in the perturbation's units. Without
    paired data: one line."""
    from helpers.builders import H, W

    from dgss.data.datamodule import DGSSDataModule
    from dgss.data.synthetic import SyntheticDomain
    from dgss.data.transforms import TrainPipeline

    def dm(domain, paired=()):
        return DGSSDataModule(sources={"s": SyntheticDomain(domain, "train", 8, H, W, paired=paired)},
                              targets={"t": SyntheticDomain("fog", "val", 2, H, W)},
                              train_pipeline=TrainPipeline(crop=(H, W), short_edge=(H, 2 * H)), batch_size=2,
                              val_batch_size=2, num_workers=0, pin_memory=False)  # fmt: skip

    paired, plain, fog = (
        next(iter(d.train_dataloader())) for d in (dm("game", ["fog"]), dm("game"), dm("fog"))
    )
    assert all(torch.equal(a, b) for a, b in zip(paired["image"], plain["image"]))  # the stream unchanged
    assert all(torch.equal(a, b) for a, b in zip(paired["label"], fog["label"]))
    assert all(
        torch.equal(a, b) for a, b in zip(paired["paired_image"], fog["image"])
    )  # same scene, same draws
    assert not torch.equal(paired["paired_image"][0], paired["image"][0])

    torch.manual_seed(0)
    m = fishertune(perturb=dict(after_blocks=[0], type="paired_render"))
    seen = []
    forward = m.fisher_forward

    def record(images, labels):
        seen.append(images.detach().clone())
        return forward(images, labels)

    m.fisher_forward = record
    trainer(tmp_path, steps=4, limit_val_batches=0).fit(m, dm("game", ["fog"]))
    assert m.stats.counts["p"] > 0 and float(m.stats.eps_ema.sum()) > 0
    # a statistic step's first forward is x′: the fog renders of its batch, prepared as the model prepares any batch
    stream = [b for _, b in zip(range(4), dm("game", ["fog"]).train_dataloader())]
    x_primes = [m.prepare_batch({"image": b["paired_image"], "label": b["label"]})[0] for b in stream]
    cleans = [m.prepare_batch(b)[0] for b in stream]
    fed = [any(torch.equal(s, x) for s in seen) for x in x_primes]
    assert sum(fed) == m.stats.counts["p"] and not any(torch.equal(a, b) for a, b in zip(x_primes, cleans))
    torch.manual_seed(0)
    m2 = fishertune(perturb=dict(after_blocks=[0], type="paired_render"))
    with pytest.raises(ConfigError, match=r"paired_render needs training data that renders each scene"):
        trainer(tmp_path / "b", steps=4, limit_val_batches=0).fit(m2, dm("game"))
