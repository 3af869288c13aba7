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

    out = inference.predict(
        fn, x, (512, 1024), multiple=16, mode="slide", crop=512, stride=341, window_batch=1
    )
    torch.testing.assert_close(out, pointwise(x))
    assert calls == [(512, 512)] * 3
    # Cityscapes at 1024x512: windows at x = 0, 341, 512 (data spec §4); BDD at 1280x720: 2 x 4
    assert inference.windows(512, 1024, (512, 512), (341, 341)) == [
        (0, 0, 512, 512),
        (0, 341, 512, 853),
        (0, 512, 512, 1024),
    ]
    bdd = inference.windows(720, 1280, (512, 512), (341, 341))
    assert len(bdd) == 8 and {b[:2] for b in bdd} == {(y, x) for y in (0, 208) for x in (0, 341, 682, 768)}


def test_windows_are_batched_across_images_and_windows():
    x = torch.randn(2, 3, 512, 1024)
    batches = []

    def fn(t):
        batches.append(t.shape[0])
        return pointwise(t)

    out = inference.predict(fn, x, (512, 1024), 16, "slide", 512, 341, window_batch=4)
    assert batches == [4, 2]  # 3 windows x 2 images in two forwards
    torch.testing.assert_close(out, pointwise(x))


def test_flip_and_multiscale_tta_average_probabilities():
    x = torch.randn(1, 3, 32, 48)
    probs = pointwise(x).softmax(1)
    torch.testing.assert_close(inference.predict(pointwise, x, (32, 48), 16, flip=True), probs)
    seen = []

    def fn(t):
        seen.append((tuple(t.shape[-2:]), bool(torch.equal(t, x.flip(-1)))))
        return pointwise(t)

    out = inference.predict(fn, x, (32, 48), 16, scales=[0.5, 1.0], flip=True)
    assert [s for s, _ in seen] == [(16, 32), (16, 32), (32, 48), (32, 48)] and seen[3][
        1
    ]  # 16x24 padded to 16x32
    half = torch.nn.functional.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)
    up = torch.nn.functional.interpolate(pointwise(half), size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, (probs + up.softmax(1)) / 2)
    with pytest.raises(ValueError, match=r"method.inference.scales=\[0.0\] must be positive"):
        inference.predict(pointwise, x, (32, 48), 16, scales=[0.0])


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
