import functools
import math
from unittest.mock import patch

import lightning.pytorch as pl
import pytest
import torch
from helpers.builders import make_dm, make_method, snapshot, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from dgss.errors import ConfigError
from dgss.methods.frozen import FrozenBackbone
from dgss.methods.full import FullFineTune
from dgss.methods.summary import parameter_summary


def test_full_trains_everything_with_backbone_at_a_tenth(tmp_path):
    torch.manual_seed(0)
    m = make_method(FullFineTune)
    before = snapshot(m)
    trainer(tmp_path).fit(m, make_dm())
    lrs = {(g["lr_mult"], g["decay_mult"]): g for g in m.trainer.optimizers[0].param_groups}
    assert set(lrs) == {(0.1, 1.0), (1.0, 1.0), (1.0, 0.0)}  # backbone (its key wins), head, head norms
    named = dict(m.named_parameters())
    changed = {k for k, v in named.items() if not torch.equal(v.detach(), before[k])}
    # every parameter received an update; the (unused) mask token is frozen, the final norm is dropped
    assert changed == {k for k, p in named.items() if p.requires_grad}
    assert {k for k, p in named.items() if not p.requires_grad} <= {"backbone.model.mask_token"}
    assert not any(k.startswith("backbone.model.norm.") for k in named)


def mmengine_param_settings(model, base_lr, base_wd, paramwise_cfg):
    """{name: (lr, weight_decay)} as w1oves/Rein's ``PEFTOptimWrapperConstructor.add_params`` (mmengine's
    ``DefaultOptimWrapperConstructor`` rule) assigns them, re-derived from its source: recursion over
    ``named_children`` with ``prefix.name``; custom keys sorted alphabetically then by length, longest first, matched
    as substrings, and a match skips every other rule; else ``norm_decay_mult`` for norm layers, ``bias_decay_mult``
    for ``bias``, ``flat_decay_mult`` for other 1-D tensors (depth-wise convs do not occur here)."""
    custom = paramwise_cfg.get("custom_keys", {})
    keys = sorted(sorted(custom), key=len, reverse=True)
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm,
                  torch.nn.GroupNorm, torch.nn.LayerNorm)  # fmt: skip
    out = {}

    def add(module, prefix):
        is_norm = isinstance(module, norm_types)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{prefix}.{name}" if prefix else name
            lr, wd = base_lr, base_wd
            for key in keys:
                if key in f"{prefix}.{name}":
                    lr = base_lr * custom[key].get("lr_mult", 1.0)
                    wd = base_wd * custom[key].get("decay_mult", 1.0)
                    break
            else:
                if is_norm and paramwise_cfg.get("norm_decay_mult") is not None:
                    wd = base_wd * paramwise_cfg["norm_decay_mult"]
                elif name == "bias" and paramwise_cfg.get("bias_decay_mult") is not None:
                    wd = base_wd * paramwise_cfg["bias_decay_mult"]
                elif param.ndim == 1 and paramwise_cfg.get("flat_decay_mult") is not None:
                    wd = base_wd * paramwise_cfg["flat_decay_mult"]
            out[full] = (lr, wd)
        for child_name, child in module.named_children():
            add(child, f"{prefix}.{child_name}" if prefix else child_name)

    add(model, "")
    return out


EMBED = {"lr_mult": 1.0, "decay_mult": 0.0}
REIN_CFG = {"custom_keys": {"norm": {"decay_mult": 0.0}, "query_embed": EMBED, "level_embed": EMBED,
                            "learnable_tokens": EMBED, "reins.scale": EMBED}, "norm_decay_mult": 0.0}  # fmt: skip
OFFICIAL_PARAMWISE = {  # the official configs, as written there (w1oves/Rein)
    "rein": REIN_CFG,  # configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py
    # configs/dinov2/dinov2_mask2former_512x512_bs1x4.py + backbone=dict(lr_mult=0.1) (issue #97)
    "full": {**REIN_CFG, "custom_keys": {**REIN_CFG["custom_keys"], "backbone": {"lr_mult": 0.1}}},
    # configs/frozen_vfms/dinov2-L_mask2former.py
    "frozen": {
        "custom_keys": {
            "query_embed": EMBED,
            "query_feat": EMBED,
            "level_embed": EMBED,
            "norm": {"decay_mult": 0.0},
        },
        "norm_decay_mult": 0.0,
    },  # fmt: skip
}


@pytest.mark.parametrize("method", sorted(OFFICIAL_PARAMWISE))
def test_parameter_groups_follow_the_official_configs(compose_cfg, method, monkeypatch):
    """The optimizer dgss builds gives every trainable tensor the lr and weight decay the official config gives it
    (Mask2Former head, DINOv2 as in the paper's recipes): biases of Linears and convs decay at 0.05; norms, query /
    level embeddings, Rein's tokens and scale do not."""
    from dgss.config import build_method

    cfg = compose_cfg([f"experiment=gta2cbm/{method}_dinov2_l", "debug=tiny", "head=mask2former"])
    m = build_method(cfg)
    monkeypatch.setattr(m, "build_scheduler", lambda opt: None)
    opt = m.configure_optimizers()["optimizer"]
    base_lr, base_wd = opt.defaults["lr"], opt.defaults["weight_decay"]
    assert (base_lr, base_wd) == (1e-4, 0.05)
    ours = {}
    for g in opt.param_groups:
        for p in g["params"]:
            ours[id(p)] = (g["lr"], g["weight_decay"])
    named = {n: p for n, p in m.named_parameters() if p.requires_grad}
    want = mmengine_param_settings(m, base_lr, base_wd, OFFICIAL_PARAMWISE[method])
    assert set(want) == set(named)
    for n, p in named.items():
        assert ours[id(p)] == pytest.approx(want[n]), n
    # the substring "norm" marks exactly the norm layers' tensors, as in the official module tree
    modules = dict(m.named_modules())
    for n in named:
        if "norm" in n:
            assert isinstance(modules[n.rsplit(".", 1)[0]], (torch.nn.LayerNorm, torch.nn.GroupNorm)), n
    got = {n: ours[id(p)][1] for n, p in named.items()}
    assert got["head.pixel_decoder.input_convs.0.0.bias"] == got["head.cls_embed.bias"] == 0.05
    assert (
        got["head.pixel_decoder.input_convs.0.1.weight"] == got["head.layers.0.norms.0.bias"] == 0.0
    )  # GN, LN
    assert got["head.level_embed.weight"] == 0.0 and got["head.pixel_decoder.level_encoding.weight"] == 0.05
    if method == "rein":
        assert (
            got["reins.mlp_delta_f.bias"] == 0.05
            and got["reins.scale"] == got["reins.learnable_tokens_a"] == 0
        )
        assert got["head.querys2feat.bias"] == 0.05
    if method == "full":  # "backbone" is the longer key: backbone norms, biases and tokens decay, at lr 1e-5
        assert got["backbone.model.blocks.0.norm1.weight"] == got["backbone.model.pos_embed"] == 0.05
        assert ours[id(named["backbone.model.blocks.0.norm1.weight"])][0] == pytest.approx(1e-5)
    if method == "frozen":
        assert got["head.query_feat.weight"] == 0.0


def test_a_configured_key_overrides_the_recipe_longest_key_first():
    m = make_method(FullFineTune, paramwise={"custom_keys": {"backbone.model.blocks.1": {"lr_mult": 0.5}}})
    mults = {n: (g["lr_mult"], g["decay_mult"]) for g in m.param_groups() for n in g["names"]}
    assert mults["backbone.model.blocks.1.mlp.fc1.weight"] == (0.5, 1.0)
    assert mults["backbone.model.blocks.0.mlp.fc1.weight"] == (0.1, 1.0)
    assert mults["head.classifier.bias"] == (1.0, 1.0)
    with pytest.raises(ConfigError, match="custom_keys.norm may set only lr_mult, decay_mult"):
        make_method(FullFineTune, paramwise={"custom_keys": {"norm": {"decay": 0.0}}})


def test_frozen_backbone_bit_identical_eval_mode_and_not_in_optimizer(tmp_path):
    torch.manual_seed(0)
    m = make_method(FrozenBackbone)
    m.backbone.model.blocks[0].drop_path1 = torch.nn.Dropout(0.5)  # a stochastic layer that must stay off
    before = snapshot(m.backbone)
    head_before = snapshot(m.head)

    modes = []
    m.backbone.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    trainer(tmp_path, steps=4).fit(m, make_dm())
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in m.head.state_dict().items())
    assert modes and not any(modes)  # every training and validation forward ran the backbone in eval mode
    opt_params = {id(p) for g in m.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.head.parameters()}
    s = parameter_summary(m)
    assert s["params/trainable"] == sum(p.numel() for p in m.head.parameters()) == s["params/head"]
    assert s["params/total"] == s["params/backbone"] + s["params/head"]
    assert math.isclose(s["params/trainable_pct"], 100 * s["params/head"] / s["params/total"])


@pytest.mark.parametrize("warmup", [0, 4])
def test_poly_schedule_with_warmup_matches_formula(tmp_path, warmup):
    m = make_method(FullFineTune, scheduler={"warmup_steps": warmup, "warmup_start_factor": 0.01, "power": 0.9},
                    optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))  # fmt: skip
    total = 12
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(
                trainer.optimizers[0].param_groups[-1]["lr"]
                / trainer.optimizers[0].param_groups[-1]["lr_mult"]
            )

    trainer(tmp_path, steps=total, callbacks=[Spy()]).fit(m, make_dm(n_train=24))
    for t, lr in enumerate(seen):
        if t < warmup:
            want = 1e-3 * (0.01 + (1 - 0.01) * t / warmup)
        else:
            want = 1e-3 * (1 - (t - warmup) / (total - warmup)) ** 0.9
        assert math.isclose(lr, want, rel_tol=1e-6, abs_tol=1e-12), (t, lr, want)


def test_num_classes_mismatch_is_one_clear_line(tmp_path):
    m = make_method(FullFineTune)
    with pytest.raises(
        ConfigError, match=r"the data has 7 classes but the model was built for num_classes=19"
    ):
        trainer(tmp_path).fit(m, make_dm(num_classes=7))


def test_crop_not_multiple_of_patch_is_refused(tmp_path):
    m = make_method(
        FullFineTune, input={"crop": [30, 64]}
    )  # method.input.crop: the data's, linked by the config
    dm = make_dm()
    with pytest.raises(
        ConfigError, match=r"crop \[30, 64\] is not a multiple of the backbone's patch size 8"
    ):
        trainer(tmp_path).fit(m, dm)


def _nan_at(method, bad_calls):
    """Make the head's loss NaN on the given calls (0-based)."""
    loss, calls = method.head.loss, []

    def patched(out, labels):
        calls.append(None)
        values = loss(out, labels)
        return {k: v * float("nan") for k, v in values.items()} if len(calls) - 1 in bad_calls else values

    method.head.loss = patched
    return calls


def test_nonfinite_loss_skips_the_step_and_k_in_a_row_abort(tmp_path):
    from dgss.cli import user_error
    from dgss.errors import TrainingAborted

    torch.manual_seed(0)
    m = make_method(FullFineTune, max_nonfinite=3)
    calls = _nan_at(m, {1, 2})
    seen = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, [p.detach().clone() for p in pl_module.parameters()]))

    t = trainer(tmp_path, steps=4, limit_val_batches=0, callbacks=[Snapshot()])
    with pytest.warns(UserWarning, match=r"non-finite loss at step 2: step skipped \(2 in a row, 2 in all\)"):
        t.fit(m, datamodule=make_dm())
    # a skipped batch is a lost iteration: the counter and the schedule move on, the weights do not
    assert len(calls) == 4 and t.global_step == 4 and [s for s, _ in seen] == [1, 2, 3, 4]
    for skipped in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(seen[0][1], seen[skipped][1]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2][1], seen[3][1]))
    assert m.nonfinite == {"total": 2, "streak": 0}
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 4

    m = make_method(FullFineTune, max_nonfinite=3)
    _nan_at(m, set(range(1, 100)))
    with pytest.raises(
        TrainingAborted, match=r"3 non-finite losses or gradients in a row at step 3 .*max_nonfinite=3"
    ) as e:
        with pytest.warns(UserWarning):
            trainer(tmp_path, steps=6, limit_val_batches=0).fit(m, datamodule=make_dm())
    assert user_error(e.value).startswith("3 non-finite losses or gradients in a row")  # one line in the CLI


def _state(trainer, method):
    """Everything a step may change: parameters, buffers (batch-norm statistics), the optimizer's per-tensor state."""
    opt = trainer.optimizers[0].state_dict()
    return {**{k: v.detach().clone() for k, v in method.state_dict().items()},
            **{f"opt.{i}.{k}": v.clone() for i, st in opt["state"].items() for k, v in st.items()}}  # fmt: skip


@pytest.mark.parametrize("fault", ["input", "gradient"])
def test_a_nonfinite_step_leaves_parameters_buffers_and_optimizer_state_bit_identical(tmp_path, fault):
    """NaN features poison a forward in training mode (the light head's batch norms update their running statistics
    before the loss exists); an inf gradient from a finite loss poisons AdamW. Either way the skipped steps change
    nothing, and the checkpoints written during the streak hold only finite tensors."""
    torch.manual_seed(0)
    m = make_method(FullFineTune, max_nonfinite=5)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()), "the test needs running statistics"
    bad = {2, 3}  # optimizer steps 2 and 3 (0-based batches) are non-finite
    states = {}

    class Fault(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if fault == "input" and batch_idx in bad:  # NaN features reach the head's batch norms
                self.handle = pl_module.backbone.register_forward_hook(
                    lambda m, i, out: [f * float("nan") for f in out]
                )
            if fault == "gradient" and batch_idx in bad:
                w = pl_module.head.classifier.weight
                self.handle = w.register_hook(lambda g: g * float("inf"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if getattr(self, "handle", None) is not None:
                self.handle.remove()
                self.handle = None
            states[batch_idx] = _state(trainer, pl_module)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    t = trainer(tmp_path, steps=5, limit_val_batches=0, callbacks=[Fault(), ckpt])
    with pytest.warns(
        UserWarning, match=rf"non-finite {'loss' if fault == 'input' else 'gradients'} at step 2"
    ):
        t.fit(m, datamodule=make_dm(n_train=16))
    assert m.nonfinite == {"total": 2, "streak": 0} and t.global_step == 5
    for k, v in states[1].items():  # after the streak: exactly the state before it
        assert torch.equal(v, states[2][k]) and torch.equal(v, states[3][k]), k
    assert any(not torch.equal(v, states[4][k]) for k, v in states[1].items())  # the next step trains
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 5
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name


def test_a_nonfinite_micro_batch_skips_its_whole_window_with_one_check_per_step(tmp_path):
    """Issue 26 (3): the loss is not checked when it is made (a host synchronisation per micro-batch) but with the
    window's gradients, in one copy at the window's end. A NaN first micro-batch of window 2 (of 2 micro-batches)
    still skips that window whole: parameters and optimizer state as after window 1, one skip counted, and the
    windows around it train; the guard's decision costs one device-to-host copy per optimizer step."""
    torch.manual_seed(0)
    m = make_method(FullFineTune, max_nonfinite=3)
    _nan_at(m, {2})  # micro-batches 2, 3 form the second window
    states, copies = {}, []
    real_stack = torch.stack

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states[batch_idx] = _state(trainer, pl_module)

    def counted_stack(tensors, *a, **k):  # the guard's flags are stacked, then copied once
        out = real_stack(tensors, *a, **k)
        if out.dtype == torch.bool:
            copies.append(len(tensors))
        return out

    t = trainer(tmp_path, steps=3, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[Look()])
    with pytest.warns(UserWarning, match=r"non-finite loss at step 1: step skipped \(1 in a row, 1 in all\)"):
        with patch.object(torch, "stack", counted_stack):
            t.fit(m, datamodule=make_dm(n_train=16))
    assert m.nonfinite == {"total": 1, "streak": 0} and t.global_step == 3
    for k, v in states[1].items():  # window 2 (batches 2, 3) changed nothing
        assert torch.equal(v, states[3][k]), k
    assert any(not torch.equal(v, states[1][k]) for k, v in states[5].items())  # window 3 trains
    assert copies == [2, 2, 2]  # per optimizer step: the losses' and the gradients' flags, one copy


def test_the_progress_bar_reads_the_metrics_every_n_steps(tmp_path):
    """Issue 26 (3): reading the logged loss for the bar is a host synchronisation; the step bar reads it every
    ``metrics_every`` steps (default: the loggers' ``log_every_n_steps``) and at the last step, not every step."""
    from dgss.callbacks import StepProgressBar

    read = []

    class Spy(StepProgressBar):
        def _update_metrics(self, trainer, pl_module):
            read.append(trainer.global_step)
            super()._update_metrics(trainer, pl_module)

    torch.manual_seed(0)
    t = pl.Trainer(accelerator="cpu", max_steps=7, limit_val_batches=0, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Spy(metrics_every=3)])  # fmt: skip
    t.fit(make_method(FullFineTune), datamodule=make_dm(n_train=16))
    assert sorted(set(read)) == [3, 6, 7]  # (Lightning's own end-of-pass hook reads once more at the end)
    t = pl.Trainer(accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Spy()], log_every_n_steps=2)  # fmt: skip
    read.clear()
    t.fit(make_method(FullFineTune), datamodule=make_dm(n_train=16))
    assert sorted(set(read)) == [2, 4, 5]
    with pytest.raises(ValueError, match="metrics_every=0 must be >= 1"):
        StepProgressBar(metrics_every=0)


def test_gradient_accumulation_keeps_the_schedule_on_optimizer_steps(tmp_path):
    torch.manual_seed(0)
    m = make_method(FullFineTune)
    batches = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            batches.append(trainer.global_step)

    t = trainer(tmp_path, steps=3, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[Count()])
    t.fit(m, datamodule=make_dm(n_train=16))
    assert batches == [0, 1, 1, 2, 2, 3]  # two batches per optimizer step; max_steps counts optimizer steps
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 3  # the poly schedule advanced once per step
