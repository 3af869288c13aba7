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
    batch = next(iter(d.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= set(range(19)) | {255}
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
        assert (
            a["name"] == b["name"]
            and torch.equal(a["image"], b["image"])
            and torch.equal(a["label"], b["label"])
        )
    assert not torch.equal(streams[0][0]["image"], streams[0][len(streams[0]) // 2]["image"])


def test_test_pipeline_keeps_label_resolution():
    img = torch.randint(0, 255, (3, 100, 200), dtype=torch.uint8)
    lab = torch.zeros(100, 200, dtype=torch.uint8)
    x, y = TestPipeline(size=(100, 50))(img, lab)
    assert x.shape == (3, 50, 100) and y.shape == (100, 200) and y.dtype == torch.int64


def test_train_pipeline_pads_label_with_ignore():
    img = torch.full((3, 20, 20), 128, dtype=torch.uint8)
    lab = torch.zeros(20, 20, dtype=torch.uint8)
    x, y = TrainPipeline(crop=(32, 32), short_edge=None, photometric=False, flip=0)(img, lab)
    assert x.shape == (3, 32, 32) and (y == 255).sum() == 32 * 32 - 400 and (y == 0).sum() == 400


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
