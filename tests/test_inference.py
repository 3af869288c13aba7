import pytest
import torch

from dgss.models import inference
from dgss.models.heads.light import LightHead


def pointwise(x):  # a translation-equivariant "model": every window sees the same per-pixel function
    return torch.cat([x, -x], dim=1)


def test_slide_equals_whole_for_a_pointwise_model_and_counts_windows():
    x = torch.randn(1, 3, 512, 1024)
    calls = []

    def fn(t):
        calls.append(tuple(t.shape[-2:]))
        return pointwise(t)

    out = inference.predict(fn, x, (512, 1024), multiple=16, mode="slide", crop=512, stride=341)
    torch.testing.assert_close(out, pointwise(x))
    assert calls == [(512, 512)] * 3  # Cityscapes at 1024x512: windows at x = 0, 341, 512 (data spec §4)
    calls.clear()
    inference.predict(fn, torch.randn(1, 3, 720, 1280), (720, 1280), 16, "slide", 512, 341)
    assert len(calls) == 8  # BDD at 1280x720: 2 x 4 windows


def test_whole_pads_to_patch_multiple_and_resizes_to_label():
    x = torch.randn(2, 3, 50, 70)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape[-2:]))
        return pointwise(t)

    out = inference.predict(fn, x, (100, 140), multiple=16)
    assert seen == [(64, 80)] and out.shape == (2, 6, 100, 140)
    small = inference.predict(fn, x, (50, 70), multiple=16)
    torch.testing.assert_close(small, pointwise(x))  # padding is cropped away again


def test_bad_mode_and_upsample_are_refused():
    with pytest.raises(ValueError, match="method.inference.mode='tiles'"):
        inference.predict(pointwise, torch.randn(1, 3, 16, 16), (16, 16), 16, mode="tiles")
    with pytest.raises(ValueError, match="head.upsample=3"):
        LightHead([8], 4, upsample=3)


def test_light_head_shapes_and_ignore():
    head = LightHead([8, 8], num_classes=5, channels=16, upsample=4)
    out = head([torch.randn(2, 8, 4, 6), torch.randn(2, 8, 2, 3)])
    assert out.shape == (2, 5, 16, 24)
    labels = torch.full((2, 64, 96), 255)
    labels[:, :8] = 1
    loss = head.loss(out, labels)["loss_ce"]
    ref = torch.nn.functional.cross_entropy(head.logits(out, (64, 96))[:, :, :8], labels[:, :8])
    torch.testing.assert_close(loss, ref)
