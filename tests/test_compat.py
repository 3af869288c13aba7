"""dgss.compat: one test per private Lightning / timm / torch API dgss uses, so an upgrade breaks here."""

import logging
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import RichProgressBar

from dgss import compat


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback, **kw):
    loader = torch.utils.data.DataLoader(torch.ones(6, 2), batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kw)  # fmt: skip
    trainer.fit(_Tiny(), loader)


def test_should_accumulate_and_batches_done_follow_the_fit_loop():
    seen = []

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append((compat.should_accumulate(trainer), compat.batches_done(trainer)))

    _fit(Look(), accumulate_grad_batches=2)
    # inside a window on batches 0, 2, 4; the counter of processed batches already includes the current one
    assert seen == [(True, 1), (False, 2), (True, 3), (False, 4), (True, 5), (False, 6)]


def test_unrepeated_distributed_sampler_visits_each_item_once():
    ranks = [
        list(compat.UnrepeatedDistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False))
        for r in (0, 1)
    ]
    assert ranks == [[0, 2, 4], [1, 3]]


def test_the_progress_bar_hooks_it_overrides_exist():
    for name in ("_initialize_train_progress_bar_id", "_get_train_description", "_update", "_update_metrics",
                 "total_train_batches"):  # fmt: skip
        assert hasattr(RichProgressBar, name), name
    bar = compat.StepProgressBar()
    assert hasattr(bar, "train_progress_bar_id") and hasattr(bar, "progress")
    assert bar.train_progress_bar_id is None and "train (steps)" in bar._get_train_description(0)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224"])
def test_vit_pos_embed_is_timms_embedding_step(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, img_size=56, depth=2).eval()
    x = torch.randn(1, 3, 56, 56)
    out = compat.vit_pos_embed(m, m.patch_embed(x))
    if name.startswith("eva"):
        tokens, rope = out
        for blk in m.blocks:
            tokens = blk(tokens, rope=rope)
    else:
        tokens = m.blocks(m.norm_pre(out))
    assert torch.allclose(m.norm(tokens), m.forward_features(x), atol=1e-5)


def test_grad_norm_is_the_norm_of_everything_and_sees_inf():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])
    assert compat.grad_norm([a, b]).item() == pytest.approx(5.0)
    assert not torch.isfinite(compat.grad_norm([a, torch.tensor([float("inf")])]))
    assert not torch.isfinite(compat.grad_norm([a, torch.tensor([float("nan")])]))


def test_quiet_fit_hides_exactly_the_false_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compat.quiet_fit():
            for message in ("Found 101 module(s) in eval mode at the start of training. This may lead to …",
                            "You're resuming from a checkpoint … and your dataloader is not resumable. …",
                            "something else entirely"):  # fmt: skip
                warnings.warn(message, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else entirely"]


def test_lightnings_tips_are_filtered_from_its_log():
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rec = lambda msg: logging.LogRecord(log.name, logging.INFO, __file__, 1, msg, None, None)  # noqa: E731
    assert not all(f.filter(rec("💡 Tip: For seamless cloud logging …")) for f in log.filters)
    assert all(f.filter(rec("GPU available: False, used: False")) for f in log.filters)


def test_the_private_tensor_and_module_names_behave_as_dgss_relies_on():
    """``attached_trainer`` (None outside a fit), ``is_batch_norm``, ``tensor_version`` (bumped by an in-place
    change: the cast-once cache's key), and the multi-tensor ops (EMA's average, FisherTune's masking)."""
    import torch.nn as nn

    assert compat.attached_trainer(pl.LightningModule()) is None
    assert compat.is_batch_norm(nn.BatchNorm2d(3)) and compat.is_batch_norm(nn.SyncBatchNorm(3))
    assert not compat.is_batch_norm(nn.LayerNorm(3))
    t = torch.zeros(3)
    v = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == v + 1
    a, b = [torch.ones(2), torch.zeros(2)], [torch.full((2,), 3.0), torch.full((2,), 2.0)]
    compat.foreach_mul_(a, b)
    assert a[0].tolist() == [3.0, 3.0] and a[1].tolist() == [0.0, 0.0]
    compat.foreach_lerp_(a, b, 0.5)
    assert a[0].tolist() == [3.0, 3.0] and a[1].tolist() == [1.0, 1.0]
    compat.foreach_copy_(a, b)
    assert torch.equal(a[1], b[1])
