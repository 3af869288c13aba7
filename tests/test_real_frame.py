"""Issue 27 (4): one real Cityscapes val frame (256×128, with its gtFine files) and one real 1024×512 street frame,
read from ``../shared/data/cityscapes-sample`` (Cityscapes terms: used from there, copied only into a test's temporary
folder, never into the repository; ``DGSS_CITYSCAPES_SAMPLE`` points elsewhere). Every test skips when the folder is
absent. The converter against the shipped trainIds, ``dgss-eval`` on the real frame, ``dgss-predict`` on the street."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import DATA, RUN, backbone_args
from PIL import Image

from dgss import convert

SAMPLE = Path(
    os.environ.get(
        "DGSS_CITYSCAPES_SAMPLE", Path(__file__).resolve().parents[2] / "shared/data/cityscapes-sample"
    )
)
FRAME = "frankfurt/frankfurt_000000_000294"
pytestmark = pytest.mark.skipif(
    not (SAMPLE / "cityscapes").is_dir(), reason=f"no Cityscapes sample at {SAMPLE}"
)


@pytest.fixture
def layout(tmp_path):
    """The sample's Cityscapes layout in a temporary data root, without the shipped trainIds (kept aside)."""
    root = tmp_path / "data"
    shutil.copytree(SAMPLE / "cityscapes", root / "cityscapes")
    shipped = root / f"cityscapes/gtFine/val/{FRAME}_gtFine_labelTrainIds.png"
    kept = tmp_path / "shipped_labelTrainIds.png"
    shutil.move(shipped, kept)
    return root, kept


def test_the_converter_reproduces_the_shipped_train_ids_and_check_reads_the_layout(layout):
    """``dgss-convert cityscapes`` on the real labelIds: the trainIds agree with the shipped ones on ≥ 99.5 % of
    pixels (the two files were downscaled separately: boundary pixels differ) with the same class set; ``check``
    reads the split without a problem."""

    root, kept = layout
    assert convert.main(["cityscapes", "--root", str(root), "--workers", "1"]) == 0
    got = np.array(Image.open(root / f"cityscapes/gtFine/val/{FRAME}_gtFine_labelTrainIds.png"))
    want = np.array(Image.open(kept))
    assert got.shape == want.shape == (128, 256)
    assert (got == want).mean() >= 0.995
    assert set(np.unique(got).tolist()) == set(np.unique(want).tolist())
    rows = [r for r in convert.check(root) if r["dataset"] == "cityscapes" and r["split"] == "val"]
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["images"] == 1
    assert rows[0]["sizes"] == ["256x128"] and set(rows[0]["label_values"]) <= set(range(19)) | {255}


@pytest.fixture
def trained(compose_cfg, tmp_path, weights):  # noqa: F811  (the fixture imported above)
    from dgss.train import train

    train(compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"]))
    return tmp_path / "checkpoints" / "last.ckpt"


def test_dgss_eval_scores_the_real_frame(compose_cfg, layout, trained):
    """``dgss-eval data=gta2cbm`` with only its Cityscapes target on the real frame (its shipped trainIds): one image
    scored, and the per-class IoU that of the model's own prediction on that frame, computed here from a confusion
    matrix."""
    from dgss.data.real import RealDataset
    from dgss.data.transforms import TestPipeline
    from dgss.eval import evaluate
    from dgss.restore import load_method

    root, kept = layout
    shutil.copy(kept, root / f"cityscapes/gtFine/val/{FRAME}_gtFine_labelTrainIds.png")
    cfg = compose_cfg([f"ckpt_path={trained}", "trainer=cpu", "data=gta2cbm", f"paths.data_dir={root}",
                       "~data.sources.gta", "~data.targets.bdd100k", "~data.targets.mapillary",
                       "data.num_workers=0"], config_name="eval")  # fmt: skip
    metrics = evaluate(cfg)
    assert "val/cityscapes/mIoU" in metrics and np.isfinite(metrics["val/cityscapes/mIoU"])
    method, _ = load_method(str(trained))
    method.eval()
    ds = RealDataset("cityscapes", "val", root)
    image, label = ds.load(0)
    x, y = TestPipeline().with_size((1024, 512))(image, label)
    with torch.no_grad():
        pred = method.predict_logits(x[None], y.shape)[0].argmax(0).numpy()
    lab = y.numpy()
    keep = lab != 255
    conf = np.zeros((19, 19), np.int64)
    np.add.at(conf, (lab[keep], pred[keep]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = union > 0
    assert metrics["val/cityscapes/mIoU"] == pytest.approx(
        100 * (inter[present] / union[present]).mean(), abs=1e-3
    )


def test_dgss_predict_on_the_real_street_frame(compose_cfg, tmp_path, trained):
    """``dgss-predict input=street_1024x512.png`` (a palette PNG): the mask at the frame's size, its values trainIds,
    and an overlay written."""
    from dgss.predict import predict

    out = tmp_path / "pred"
    cfg = compose_cfg([f"ckpt_path={trained}", f"input={SAMPLE / 'street_1024x512.png'}", f"output={out}",
                       "progress=false", "device=cpu"], config_name="predict")  # fmt: skip
    assert predict(cfg)["images"] == 1
    mask = Image.open(out / "masks/street_1024x512.png")
    assert mask.size == (1024, 512) and mask.mode == "P" and np.array(mask).max() < 19
    overlay = Image.open(out / "overlays/street_1024x512.jpg")
    assert overlay.size == (1024, 512)
    assert not (SAMPLE / "masks").exists()  # nothing written next to the sample
