import numpy as np
import pytest
import torch

from dgss.data.classes import CITYSCAPES_CLASSES
from dgss.data.synthetic import DOMAINS, SOURCE_DOMAINS, TARGET_DOMAINS, SyntheticDomain, render_sample
from dgss.errors import ConfigError


def test_deterministic_per_domain_index_seed():
    a_img, a_lab = render_sample("photo", 7, 64, 128, seed=3)
    b_img, b_lab = render_sample("photo", 7, 64, 128, seed=3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, c_lab = render_sample("photo", 7, 64, 128, seed=4)
    assert not np.array_equal(a_lab, c_lab)
    d_img, d_lab = render_sample("photo", 8, 64, 128, seed=3)
    assert not np.array_equal(a_lab, d_lab)


def test_same_layout_in_every_domain_only_appearance_shifts():
    labels, images = {}, {}
    for d in DOMAINS:
        images[d], labels[d] = render_sample(d, 3, 96, 192)
    ref = labels["game"]
    for d in DOMAINS:
        assert np.array_equal(labels[d], ref), d
    for d in TARGET_DOMAINS:  # every target looks different from the source
        diff = np.abs(images[d].astype(float) - images["game"].astype(float)).mean()
        assert diff > 15, (d, diff)
    assert len(SOURCE_DOMAINS) == 1 and len(TARGET_DOMAINS) >= 3


def test_at_least_ten_cityscapes_classes_are_drawn():
    seen = set()
    for i in range(30):
        _, lab = render_sample("game", i, 64, 128)
        seen |= set(np.unique(lab).tolist())
    assert seen <= set(range(len(CITYSCAPES_CLASSES)))
    assert len(seen) >= 16, sorted(seen)


def test_any_resolution_same_scene():
    _, small = render_sample("game", 5, 64, 128)
    _, big = render_sample("game", 5, 256, 512)
    agree = (big[2::4, 2::4] == small).mean()  # nearest subsample of the 4x render
    assert agree > 0.93, agree


def test_dataset_splits_are_disjoint_and_items_typed():
    train = SyntheticDomain("game", "train", length=4, height=32, width=64)
    val = SyntheticDomain("game", "val", length=4, height=32, width=64)
    assert len(train) == 4
    image, label = train.load(0)
    assert (
        image.shape == (3, 32, 64) and label.shape == (32, 64) and image.dtype == label.dtype == torch.uint8
    )
    assert not np.array_equal(label.numpy(), val.load(0)[1].numpy())
    assert train.name(3) == "game/train/000003"
    with pytest.raises(IndexError):
        train.load(4)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(domain="snow"), "synthetic domain='snow' does not exist"), (dict(domain="game", split="dev"), "split='dev'"),
     (dict(domain="game", length=0), "must be positive")],
)  # fmt: skip
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SyntheticDomain(**kwargs)
