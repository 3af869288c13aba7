from types import SimpleNamespace

import pytest
import torch

from dgss.data.datamodule import DGSSDataModule
from dgss.data.synthetic import SyntheticDomain
from dgss.data.transforms import TestPipeline, TrainPipeline
from dgss.errors import ConfigError


def dm(**kw):
    args = dict(
        sources={"a": SyntheticDomain("game", "train", 6, 32, 64), "b": SyntheticDomain("photo", "train", 10, 32, 64)},
        targets={"fog": SyntheticDomain("fog", "val", 5, 32, 64), "night": SyntheticDomain("night", "val", 3, 32, 64)},
        train_pipeline=TrainPipeline(crop=(32, 32), short_edge=(24, 48), max_long_edge=128),
        batch_size=2, val_batch_size=2, num_workers=0, pin_memory=False,
    )  # fmt: skip
    args.update(kw)
    return DGSSDataModule(**args)


def test_train_stream_and_named_eval_loaders():
    d = dm()
    batch = next(iter(d.train_dataloader()))  # uint8 as loaded: the method normalises and pads
    assert len(batch["image"]) == len(batch["label"]) == 2
    for img, lab in zip(batch["image"], batch["label"]):
        assert img.dtype == lab.dtype == torch.uint8 and img.shape[0] == 3 and img.shape[1:] == lab.shape
        assert img.shape[1] <= 32 and img.shape[2] <= 32  # crops of images smaller than the crop stay smaller
        assert set(lab.unique().tolist()) <= set(range(19)) | {255}
    assert d.target_names == ["fog", "night"] and d.num_classes == 19
    loaders = d.val_dataloader()
    assert [len(dl.dataset) for dl in loaders] == [5, 3]
    names = [n for b in loaders[0] for n in b["name"]]
    assert names == [f"fog/val/{i:06d}" for i in range(5)]


def test_source_weights_steer_the_stream():
    d = dm(source_weights={"a": 1.0, "b": 0.0})
    names = [n for _ in range(3) for b in d.train_dataloader() for n in b["name"]]
    assert names and all(n.startswith("game/") for n in names)


def test_ddp_eval_samplers_cover_each_image_once():
    d = dm()
    seen = []
    for rank in range(2):
        d.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen += [n for b in d.val_dataloader()[0] for n in b["name"]]
    assert sorted(seen) == [f"fog/val/{i:06d}" for i in range(5)]  # 3 + 2, no padded duplicate
    train = []
    for rank in range(2):
        d.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        train.append(list(iter(d.train_dataloader().sampler)))
    assert len(train[0]) == len(train[1]) == 8 and not {t.item for t in train[0]} & {t.item for t in train[1]}
    d.trainer = None
    single = set(iter(d.train_dataloader().sampler))
    assert set(train[0]) | set(train[1]) == single  # the same draws, seeds included: augmentation per draw


def test_the_stream_is_the_same_whatever_the_number_of_workers():
    """Every draw carries its augmentation seed: 0 or 2 loader workers give identical batches over two passes."""
    streams = []
    for workers in (0, 2):
        loader = dm(num_workers=workers).train_dataloader()
        streams.append([b for _ in range(2) for b in loader])
    for a, b in zip(*streams, strict=True):
        assert a["name"] == b["name"]
        assert all(
            torch.equal(x, y) for x, y in zip(a["image"] + a["label"], b["image"] + b["label"], strict=True)
        )
    first, later = streams[0][0]["image"][0], streams[0][len(streams[0]) // 2]["image"][0]
    assert first.shape != later.shape or not torch.equal(first, later)


def test_test_pipeline_keeps_label_resolution():
    img = torch.randint(0, 255, (3, 100, 200), dtype=torch.uint8)
    lab = torch.zeros(100, 200, dtype=torch.uint8)
    x, y = TestPipeline(size=(100, 50))(img, lab)
    assert x.shape == (3, 50, 100) and x.dtype == torch.uint8 and y.shape == (100, 200)


def test_the_model_pads_after_normalising_bottom_right_with_image_0_and_label_255():
    """mmseg's SegDataPreProcessor: the pipeline leaves a small crop small (so padding never enters the flip or the
    photometric distortion); the method normalises, then pads to the crop size bottom / right."""
    from helpers.builders import make_method

    from dgss.methods.full import FullFineTune

    img = torch.full((3, 20, 24), 128, dtype=torch.uint8)
    lab = torch.zeros(20, 24, dtype=torch.uint8)
    x, y = TrainPipeline(crop=(32, 32), short_edge=None, photometric=False, flip=1.0)(img, lab)
    assert x.shape == (3, 20, 24) and x.dtype == torch.uint8 and (x == 128).all()  # flipped, not padded
    m = make_method(FullFineTune)
    m.input.crop = (32, 32)
    images, labels = m.prepare_batch({"image": [x, x[:, :16, :16]], "label": [y, y[:16, :16]]})
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in m.backbone.normalization)
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    assert torch.allclose(images[0, :, :20, :24], (128 / 255 - mean) / std)  # the image, normalised
    assert (images[0, :, 20:] == 0).all() and (
        images[0, :, :, 24:] == 0
    ).all()  # padding: 0 after normalising
    assert (
        (labels[0, :20, :24] == 0).all()
        and (labels[0, 20:] == 255).all()
        and (labels[0, :, 24:] == 255).all()
    )
    assert (labels[1, 16:] == 255).all() and (labels[1, :16, :16] == 0).all()
    # a batch of full crops takes the batched path (no padding): bit-identical to normalising image by image
    g = torch.Generator().manual_seed(0)
    full = [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(3)]
    labs = [torch.randint(0, 19, (32, 32), generator=g, dtype=torch.uint8) for _ in range(3)]
    images, labels = m.prepare_batch({"image": full, "label": labs})
    assert torch.equal(images, torch.stack([m.normalize(x) for x in full])) and labels.dtype == torch.int64
    assert torch.equal(labels, torch.stack(labs).long())


@pytest.mark.parametrize(
    "kw, match",
    [(dict(source_weights={"zzz": 1.0}), r"data.source_weights names \['zzz'\]"),
     (dict(exclude_from_mean=["cityscapes"]), r"data.exclude_from_mean names \['cityscapes'\]"),
     (dict(num_classes=7, class_names=["a", "b"]), "data.num_classes=7 but data.class_names has 2 names"),
     (dict(batch_size=0), "data.batch_size=0")],
)  # fmt: skip
def test_bad_data_config_is_one_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        dm(**kw)


def test_no_sources_is_fine_for_evaluation_and_refused_for_training():
    data = dm(sources={})  # dgss-eval builds the targets only
    assert len(data.val_dataloader()) == len(data.targets)
    with pytest.raises(ConfigError, match="data.sources is empty; name at least one training data set"):
        data.train_dataloader()


def test_a_batch_goes_to_the_device_with_its_bookkeeping_left_on_the_host():
    """Issue 26 (3): the skipped counts the callbacks read every step stay on the host (a device copy would make the
    host wait for the device each step); images and labels move."""
    d = dm()
    for batch in (next(iter(d.train_dataloader())), next(iter(d.val_dataloader()[0]))):
        moved = d.transfer_batch_to_device(batch, torch.device("meta"), 0)
        images = moved["image"] if isinstance(moved["image"], torch.Tensor) else moved["image"][0]
        assert images.device.type == "meta" and moved["label"][0].device.type == "meta"
        assert moved["skipped"].device.type == "cpu" and moved["name"] == batch["name"]


def test_a_seeded_source_subset_is_fixed_sorted_and_the_only_thing_trained_on():
    """Issue 27 (2): ``data.source_subset`` draws ``size`` items of one source once from ``seed`` (sorted: the sampler
    shuffles); the same seed gives the same subset (in any process: torch's seeded randperm), another seed another;
    the training stream draws only from it; its options travel in the DataModule's state; bad options are one line."""
    from dgss.data.subset import SourceSubset, subset_indices

    a = dm(source_subset={"size": 4, "seed": 3, "source": "b"})
    sub = a.sources["b"]
    assert isinstance(sub, SourceSubset) and len(sub) == 4 and sub.indices == sorted(sub.indices)
    assert sub.indices == dm(source_subset={"size": 4, "seed": 3, "source": "b"}).sources["b"].indices
    assert sub.indices != subset_indices(10, 4, seed=4) and len(a.sources["a"]) == 6  # the other source whole
    assert [sub.name(i) for i in range(4)] == [a.sources["b"].data.name(j) for j in sub.indices]
    allowed = {sub.name(i) for i in range(4)} | {a.sources["a"].name(i) for i in range(6)}
    names = [n for _, batch in zip(range(6), a.train_dataloader()) for n in batch["name"]]
    assert set(names) <= allowed and any(n.startswith("photo/") for n in names)
    assert a.source_subset.seed == 3 and a.source_subset.source == "b"
    with pytest.raises(ConfigError, match=r"name the source to draw from .*\['a', 'b'\]"):
        dm(source_subset={"size": 4})
    with pytest.raises(ConfigError, match=r"size=11 must be between 1 and the source's 10 items"):
        dm(source_subset={"size": 11, "source": "b"})
    with pytest.raises(ConfigError, match=r"takes size \(required\), seed and source"):
        dm(source_subset={"size": 4, "sead": 1, "source": "b"})
    with pytest.raises(ConfigError, match=r"source='gta' is not in data.sources"):
        dm(source_subset={"size": 4, "source": "gta"})


def test_resuming_with_another_source_subset_is_refused(compose_cfg):
    from dgss.train import check_unchanged, model_config

    stored = compose_cfg(["data.source_subset={size: 4, seed: 0}"])
    ckpt = {"dgss_config": model_config(stored)}
    check_unchanged(compose_cfg(["data.source_subset={size: 4, seed: 0}"]), ckpt, "x.ckpt")  # the same: fine
    with pytest.raises(ConfigError, match=r"data.source_subset.seed=0 \(this command: 1\)"):
        check_unchanged(compose_cfg(["data.source_subset={size: 4, seed: 1}"]), ckpt, "x.ckpt")
