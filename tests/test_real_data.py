"""Real data sets: label maps against the spec's tables, the Rein on-disk layouts on fixtures, one-line errors."""

import numpy as np
import pytest
import torch
from helpers.real_data import FIXTURES, write_all_fixtures, write_pair
from PIL import Image

from dgss.data.label_maps import (
    CITYSCAPES_ID_TO_TRAIN,
    MAPILLARY_V12_TO_TRAIN,
    SYNTHIA_ID_TO_TRAIN,
    lookup_table,
    to_train_ids,  # fmt: skip
)
from dgss.data.real import LAYOUTS, RealDataset
from dgss.data.samples import Samples
from dgss.data.transforms import TestPipeline
from dgss.errors import ConfigError


def test_label_maps_follow_the_spec_tables():
    city = lookup_table(CITYSCAPES_ID_TO_TRAIN)
    assert [int(city[i]) for i in (7, 8, 11, 24, 26, 31, 33)] == [0, 1, 2, 11, 13, 16, 18]
    assert all(city[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))
    syn = lookup_table(SYNTHIA_ID_TO_TRAIN, 65536)
    assert [int(syn[i]) for i in (3, 4, 2, 21, 1, 10, 8, 12, 11)] == [0, 1, 2, 3, 10, 11, 13, 17, 18]
    assert syn[0] == 255 and syn[13] == 255 and syn[22] == 255
    assert len(MAPILLARY_V12_TO_TRAIN) == 66 and sorted(set(MAPILLARY_V12_TO_TRAIN) - {255}) == list(
        range(19)
    )
    mp = lookup_table(MAPILLARY_V12_TO_TRAIN)
    named = {
        2: 1,
        7: 0,
        13: 0,
        20: 12,
        23: 0,
        27: 10,
        44: 5,
        46: 7,
        48: 6,
        49: 7,
        52: 18,
        55: 13,
        58: 16,
        61: 14,
    }
    assert {k: int(mp[k]) for k in named} == named
    assert all(mp[i] == 255 for i in (0, 4, 5, 12, 16, 31, 43, 51, 56, 59, 63, 64, 65))
    raw = np.array([[7, 26, 300], [0, 33, 24]])
    assert to_train_ids(raw, city).tolist() == [[0, 13, 255], [255, 18, 11]]


@pytest.mark.parametrize("key", list(FIXTURES), ids=["/".join(k) for k in FIXTURES])
def test_each_dataset_reads_its_layout(tmp_path, key):
    dataset, split = key
    label = write_pair(tmp_path, *FIXTURES[key])
    ds = RealDataset(dataset, split, tmp_path)
    assert len(ds) == 1 and split in LAYOUTS[dataset]
    image, lab = ds.load(0)
    assert image.shape == (3, 6, 8) and image.dtype == torch.uint8 and ds.name(0).startswith(f"{dataset}/")
    assert np.array_equal(lab.numpy(), label)  # trainIds unchanged, 255 kept


def test_bad_data_errors_name_the_file_or_the_layout(tmp_path):
    with pytest.raises(ConfigError, match="data root .* does not exist; set DGSS_DATA_ROOT"):
        RealDataset("gta", "all", tmp_path / "nowhere")
    with pytest.raises(
        ConfigError,
        match=r"no images; expected .*gta/images/\*.png with labels .*"
        r"\(prepare: dgss-convert gta --root",
    ):
        RealDataset("gta", "all", tmp_path)
    with pytest.raises(ConfigError, match="cityscapes has no split 'test'"):
        RealDataset("cityscapes", "test", tmp_path)
    write_pair(tmp_path, "gta/images/1.png", "gta/labels/1_labelTrainIds.png")
    (tmp_path / "gta/images/2.png").write_bytes((tmp_path / "gta/images/1.png").read_bytes())
    with pytest.raises(ConfigError, match=r"1 of 2 images have no trainId label, e.g. .*2_labelTrainIds.png"):
        RealDataset("gta", "all", tmp_path)
    Image.fromarray(np.zeros((6, 4), np.uint8)).save(tmp_path / "gta/labels/2_labelTrainIds.png")
    with pytest.raises(ConfigError, match=r"2.png is 8x6 but its label .*2_labelTrainIds.png is 4x6"):
        RealDataset("gta", "all", tmp_path).load(1)
    write_pair(tmp_path, "gta/images/2.png", "gta/labels/2_labelTrainIds.png", values=(7, 26, 33))
    ds = RealDataset("gta", "all", tmp_path)
    with pytest.raises(ConfigError, match=r"values \[26, 33\] outside 0..18 and 255: not converted"):
        ds.load(1)
    (tmp_path / "gta/labels/2_labelTrainIds.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"cannot read .*2_labelTrainIds.png"):
        ds.load(1)
    skipping = Samples(RealDataset("gta", "all", tmp_path, on_bad="skip"), TestPipeline())
    assert skipping[1]["name"] == "gta/1.png" and skipping[1]["skipped"] == 1  # the next good one, counted
    assert skipping[0]["skipped"] == 0
    left_out = Samples(RealDataset("gta", "all", tmp_path, on_bad="skip"), TestPipeline(), substitute=False)
    assert left_out[1] == {"image": None, "label": None, "name": "gta/2.png", "skipped": 1}  # evaluation


def test_skipped_samples_reach_the_callback_from_loader_workers(tmp_path):
    import torch

    from dgss.callbacks import SkippedSamples

    for n in range(4):
        write_pair(tmp_path, f"gta/images/{n}.png", f"gta/labels/{n}_labelTrainIds.png")
    (tmp_path / "gta/labels/2_labelTrainIds.png").write_bytes(b"broken")
    ds = Samples(RealDataset("gta", "all", tmp_path, on_bad="skip"), TestPipeline())
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    batches = list(loader)  # counted in the worker process: each sample carries its count

    class Module:
        domains = ["gta"]
        logged = {}

        def log(self, key, value, **kw):
            self.logged[key] = value

    cb, module = SkippedSamples(), Module()
    with pytest.warns(UserWarning, match="1 training samples skipped so far"):
        for i, b in enumerate(batches):
            cb.on_train_batch_end(None, module, None, b, i)
    assert cb.train == 1 and module.logged["data/skipped_train"] == 1.0  # ... and still reaches the log
    cb.on_validation_batch_end(None, module, None, batches[1], 1)
    with pytest.warns(UserWarning, match="skipped in this validation .*: gta 1"):
        cb.on_validation_epoch_end(None, module)


def test_acdc_all_is_the_four_conditions(tmp_path):
    write_all_fixtures(tmp_path)
    ds = RealDataset("acdc", "all/val", tmp_path)
    assert sorted(p[0].parts[-4] for p in ds.pairs) == ["fog", "night", "rain", "snow"]
    assert all(lab.is_file() and lab.parts[-4] == img.parts[-4] for img, lab in ds.pairs)


def test_gta_official_split_from_split_mat(tmp_path):
    from scipy.io import savemat

    for n in range(1, 6):
        write_pair(tmp_path, f"gta/images/{n:05d}.png", f"gta/labels/{n:05d}_labelTrainIds.png")
    assert len(RealDataset("gta", "all", tmp_path)) == 5
    with pytest.raises(ConfigError, match=r"split 'train' needs .*gta/split.mat .*or use split=all"):
        RealDataset("gta", "train", tmp_path)
    savemat(tmp_path / "gta/split.mat", {"trainIds": [[1], [2], [4]], "valIds": [[3]], "testIds": [[5]]})
    assert [p[0].name for p in RealDataset("gta", "train", tmp_path).pairs] == [
        "00001.png",
        "00002.png",
        "00004.png",
    ]
    assert [p[0].name for p in RealDataset("gta", "test", tmp_path).pairs] == ["00005.png"]


def test_evaluation_with_on_bad_skip_scores_each_readable_image_once(tmp_path):
    """Four target images, the third's label broken: with on_bad=skip the IoU is exactly that of the other three
    (not the fourth counted twice), and metrics.json says 3 images scored, 1 skipped."""
    import json

    import lightning.pytorch as pl
    import torch
    from helpers.builders import make_method

    from dgss.callbacks import IoUTables
    from dgss.data.datamodule import DGSSDataModule
    from dgss.data.synthetic import SyntheticDomain
    from dgss.data.transforms import TestPipeline
    from dgss.methods.frozen import FrozenBackbone

    rng = np.random.default_rng(1)
    for n in range(4):  # labels differ per image, so counting one twice changes the IoU
        write_pair(tmp_path, f"gta/images/{n}.png", f"gta/labels/{n}_labelTrainIds.png", size=(64, 32),
                    values=tuple(rng.integers(0, 19, 9).tolist()) + (255,))  # fmt: skip
    (tmp_path / "gta/labels/2_labelTrainIds.png").write_bytes(b"broken")
    target = RealDataset("gta", "all", tmp_path, on_bad="skip")
    dm = DGSSDataModule(sources={"s": SyntheticDomain("game", "train", 4, 32, 64)}, targets={"t": target},
                        test_pipeline=TestPipeline(), val_batch_size=2, num_workers=0, pin_memory=False)  # fmt: skip
    torch.manual_seed(0)
    m = make_method(FrozenBackbone)
    out = tmp_path / "run"
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[IoUTables(out, console=False)]).validate(m, datamodule=dm)  # fmt: skip
    assert m.last_counts == {"t": {"images": 3, "skipped": 1}}
    conf = np.zeros((19, 19), np.int64)  # the reference: a confusion matrix over the three readable images
    m.eval()
    with torch.no_grad():
        for n in (0, 1, 3):
            s = dm.eval_samples["t"][n]
            pred = m.predict_logits(s["image"][None], s["label"].shape).argmax(1)[0].numpy()
            lab = s["label"].numpy()
            keep = lab != 255
            np.add.at(conf, (lab[keep], pred[keep]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    want = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    np.testing.assert_allclose(m.last_val["t"].numpy(), want, rtol=1e-6)
    saved = json.loads((out / "metrics.json").read_text())[-1]["domains"]["t"]
    assert saved["images"] == 3 and saved["skipped"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_is_named_with_loader_workers_too(tmp_path, workers):
    """Torch re-raises a worker's error as "Caught ConfigError in DataLoader worker process 1." + a traceback; the
    one line dgss prints is the worker's own message, naming the file."""
    import torch

    from dgss.cli import user_error

    for n in range(4):
        write_pair(tmp_path, f"gta/images/{n}.png", f"gta/labels/{n}_labelTrainIds.png")
    (tmp_path / "gta/labels/3_labelTrainIds.png").write_bytes(b"broken")
    loader = torch.utils.data.DataLoader(
        Samples(RealDataset("gta", "all", tmp_path), TestPipeline()), batch_size=1, num_workers=workers
    )
    with pytest.raises(ConfigError) as e:
        list(loader)
    msg = user_error(e.value)
    assert msg.startswith("cannot read ") and "3_labelTrainIds.png" in msg and "\n" not in msg, msg


def test_a_target_with_every_image_skipped_is_named_and_left_out_of_mean_over(tmp_path, caplog):
    """Issue 25 (9): a target whose images were all skipped got mIoU NaN and was silently left out of the mean
    over targets, while metrics.json listed it in mean_over. Now a warning names it and metrics.json records the
    targets the mean really is over."""
    import json
    import logging

    import lightning.pytorch as pl
    import torch
    from helpers.builders import make_method

    from dgss.callbacks import IoUTables
    from dgss.data.datamodule import DGSSDataModule
    from dgss.data.synthetic import SyntheticDomain
    from dgss.data.transforms import TestPipeline
    from dgss.methods.frozen import FrozenBackbone

    write_pair(tmp_path, "gta/images/0.png", "gta/labels/0_labelTrainIds.png", size=(64, 32))
    write_pair(tmp_path, "synthia/RGB/0.png", "synthia/GT/LABELS/0_labelTrainIds.png", size=(64, 32))
    (tmp_path / "synthia/GT/LABELS/0_labelTrainIds.png").write_bytes(b"broken")
    targets = {"ok": RealDataset("gta", "all", tmp_path, on_bad="skip"),
               "lost": RealDataset("synthia", "all", tmp_path, on_bad="skip")}  # fmt: skip
    dm = DGSSDataModule(sources={"s": SyntheticDomain("game", "train", 4, 32, 64)}, targets=targets,
                        test_pipeline=TestPipeline(), val_batch_size=1, num_workers=0, pin_memory=False)  # fmt: skip
    torch.manual_seed(0)
    m = make_method(FrozenBackbone)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dgss"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[IoUTables(out, console=False)]).validate(m, datamodule=dm)  # fmt: skip
    assert "lost scored no pixel (mIoU NaN: were all its images skipped?)" in caplog.text
    saved = json.loads((out / "metrics.json").read_text())[-1]
    assert saved["mean_over"] == ["ok"] and saved["not_scored"] == ["lost"]
    assert saved["mean_mIoU"] == pytest.approx(saved["domains"]["ok"]["mIoU"])


def test_the_class_count_cache_follows_relabelled_files_and_survives_a_bad_cache(tmp_path, caplog):
    """Issue 25 (9): the rare-class cache was keyed by label names only (labels re-converted in place were sampled
    from stale counts) and a pickled or truncated cache file gave a traceback. Now the key holds each label's size
    and mtime, and an unreadable cache is counted again with a warning (never unpickled)."""
    import logging
    import os

    from dgss.data.rare_class import class_pixel_counts

    for n in range(2):
        write_pair(
            tmp_path, f"gta/images/{n}.png", f"gta/labels/{n}_labelTrainIds.png", size=(8, 6), values=(1, 2)
        )
    ds = RealDataset("gta", "all", tmp_path)
    cache = tmp_path / "cache"
    first = class_pixel_counts(ds, 19, cache)
    assert first[:, 1:3].sum() == 2 * 8 * 6 and first[:, 5].sum() == 0
    label = tmp_path / "gta/labels/0_labelTrainIds.png"
    stamp = label.stat()
    Image.fromarray(np.full((6, 8), 5, np.uint8)).save(label)  # re-converted in place ...
    os.utime(label, ns=(stamp.st_atime_ns, stamp.st_mtime_ns - 10**9))  # ... with an older mtime (unzip)
    again = class_pixel_counts(RealDataset("gta", "all", tmp_path), 19, cache)
    assert again[0, 5] == 8 * 6 and again[1].tolist() == first[1].tolist()
    for f in cache.glob("class_pixels_*.npy"):  # a crafted (pickled) and a truncated cache file
        np.save(f, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="dgss.data"):
        assert np.array_equal(class_pixel_counts(RealDataset("gta", "all", tmp_path), 19, cache), again)
    assert "is unreadable (ValueError); counting again" in caplog.text
    for f in cache.glob("class_pixels_*.npy"):
        f.write_bytes(f.read_bytes()[:40])
    assert np.array_equal(class_pixel_counts(RealDataset("gta", "all", tmp_path), 19, cache), again)
