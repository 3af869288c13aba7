"""data=folder: your own images + label PNGs + classes.yaml, through training (rare-class sampling on), dgss-eval,
dgss-predict and dgss-convert check; the class count flows from classes.yaml into the head, the IoU tables and the
checkpoint. classes.yaml is data: every field checked, nothing in it executed."""

import json

import numpy as np
import pytest
import yaml
from helpers.folder_data import CLASSES, make_folder
from helpers.runs import RUN
from PIL import Image

from dgss import convert
from dgss.cli import user_error
from dgss.data.folder import FolderDataset, read_classes
from dgss.data.synthetic import render_sample
from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.predict import predict
from dgss.restore import load_method
from dgss.train import train


def test_labels_are_mapped_to_train_ids_through_the_class_file(tmp_path):
    root = make_folder(tmp_path / "mine")
    ds = FolderDataset(root, "train")
    assert len(ds) == 6 and ds.num_classes == 3 and ds.name(0) == "mine/frame000.jpg"
    image, label = ds.load_arrays(0)
    _, want = render_sample("game", 0, 64, 128, 0)
    expect = np.full_like(want, 255)
    for train_id, new in ((0, 0), (10, 1), (13, 2)):
        expect[want == train_id] = new
    assert image.shape == (64, 128, 3) and np.array_equal(label, expect)
    assert set(np.unique(label)) <= {0, 1, 2, 255}


@pytest.mark.parametrize(
    "text, message",
    [
        ("names: [a, b]\ncolours: [[1, 2, 3]]\n", "unknown field 'colours'"),
        ("names: [a, a]\n", "the class name 'a' appears twice"),
        ("names: [a, b]\ncolors: [[1, 2, 3]]\n", "colors must list one"),
        ("names: [a, b]\ncolors: [[1, 2, 300], [0, 0, 0]]\n", r"colors\[0\]=300"),
        ("names: [a]\nid_to_train: {7: 3}\n", r"id_to_train\[7\]=3: an integer in 0..0"),
        ("names: [a]\nid_to_train: {300: 0}\n", "id_to_train key=300"),
        ("names: []\n", "names must be a non-empty list"),
        ("- a\n- b\n", "must be a mapping"),
        ("names: [a\n", "is not readable YAML"),
        ("!!python/object/apply:os.system ['touch PWNED']\n", "is not readable YAML"),
    ],
)
def test_a_bad_class_file_is_one_line_and_nothing_in_it_runs(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        read_classes(tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "PWNED").exists()


def test_a_folder_trains_evaluates_predicts_and_checks_with_its_own_classes(compose_cfg, tmp_path):
    root = make_folder(tmp_path / "mine")
    cfg = compose_cfg(["data=folder", f"folder.root={root}", "data.train_pipeline.crop=[64,64]",
                       "data.train_pipeline.scales=[128]", "data.batch_size=2", "data.val_batch_size=1",
                       "data.num_workers=0", "data.pin_memory=false", "backbone=toy", "backbone.tiny=true",
                       "backbone.weights=null", "backbone.img_size=64", "method=full",
                       f"data.rare_class_sampling={{temperature: 0.01, min_pixels: 1, cache_dir: {tmp_path / 'rcs'}}}",
                       *RUN])  # fmt: skip
    assert cfg.data.num_classes == 3 and list(cfg.data.class_names) == ["road", "sky", "car"]
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    method, saved = load_method(str(ckpt))
    assert method.num_classes == 3 and list(saved.data.class_names) == ["road", "sky", "car"]
    assert method.head.classifier.out_channels == 3
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert set(rows[-1]["domains"]["folder"]["per_class"]) == {"road", "sky", "car"}
    metrics = evaluate(compose_cfg([f"ckpt_path={ckpt}", "trainer=cpu", "~logger"], config_name="eval"))
    assert "val/folder/mIoU" in metrics
    table = (
        (tmp_path / "iou.csv").read_text().splitlines()
    )  # the evaluation's IoU table: the folder's classes
    assert [row.split(",")[3] for row in table[1:5]] == ["road", "sky", "car", "mIoU"]
    # another folder with the same classes, named on the command line
    other = make_folder(tmp_path / "other", n_train=1, n_val=3)
    metrics = evaluate(compose_cfg([f"ckpt_path={ckpt}", "data=folder", f"folder.root={other}",
                                    "data.num_workers=0", "trainer=cpu", "~logger"], config_name="eval"))  # fmt: skip
    assert "val/folder/mIoU" in metrics
    # a class file edited after training: the evaluation refuses in one line instead of scoring other classes
    (root / "classes.yaml").write_text(yaml.safe_dump({**CLASSES, "names": ["road", "car", "sky"]}))
    with pytest.raises(Exception) as e:
        evaluate(compose_cfg([f"ckpt_path={ckpt}", "trainer=cpu", "~logger"], config_name="eval"))
    assert (
        "classes.yaml names ['road', 'car', 'sky'], but the config (or the checkpoint) was made with"
        in user_error(e.value)
    )
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    # dgss-predict colours the classes with classes.yaml's colours
    out = tmp_path / "pred"
    predict(compose_cfg([f"ckpt_path={ckpt}", f"input={root / 'images' / 'val'}", f"output={out}",
                         "progress=false", "device=cpu"], config_name="predict"))  # fmt: skip
    mask = Image.open(out / "masks" / "seq0" / "frame000.png")
    assert mask.getpalette()[:9] == [128, 64, 128, 70, 130, 180, 0, 0, 142]
    # dgss-convert check reads the folder through the same class file
    rows = {r["split"]: r for r in convert.check(root)}
    assert rows.keys() == {"train", "val"} and rows["train"]["images"] == 6
    assert set(rows["val"]["label_values"]) <= {0, 1, 2, 255} and "error" not in rows["val"]
