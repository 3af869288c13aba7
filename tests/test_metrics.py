import math

import torch

from dgss.metrics import DomainIoU, summarize


def test_per_class_iou_against_hand_computed_values():
    # 4 classes; class 3 is absent from label and prediction -> NaN, not 0; 255 is ignored
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    m = DomainIoU(["a", "b"], num_classes=4)
    m.update(0, preds, target)
    iou = m.compute()["a"]
    # flat positions 0..5 count (6, 7 are ignored). class 0: TP pos0, FP pos5, FN pos1 -> 1/3
    # class 1: TP pos2, pos3, FP pos1 -> 2/3; class 2: TP pos4, FN pos5 -> 1/2; class 3: union 0 -> NaN
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2]))
    assert math.isnan(iou[3])
    s = summarize({"a": iou})
    assert math.isclose(s["a/mIoU"], 100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, rel_tol=1e-6)


def test_confusion_accumulates_over_the_set_not_per_image():
    m = DomainIoU(["a"], num_classes=2)
    m.update(0, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # IoU0 3/4, IoU1 0
    m.update(0, torch.tensor([1]), torch.tensor([1]))  # IoU1 alone would be 1
    iou = m.compute()["a"]
    assert torch.allclose(iou, torch.tensor([3 / 4, 1 / 2]))  # pooled: class 1 TP 1, FN 1


def test_mean_over_targets_excludes_the_source_and_skips_empty():
    per = {
        "src": torch.tensor([1.0, 1.0]),
        "t1": torch.tensor([0.5, float("nan")]),
        "t2": torch.tensor([0.2, 0.4]),
    }
    s = summarize(per, mean_over=["t1", "t2"])
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-6)  # noqa: E731  (float32 IoUs)
    assert close(s["src/mIoU"], 100.0) and close(s["t1/mIoU"], 50.0) and close(s["t2/mIoU"], 30.0)
    assert close(s["mean_mIoU"], 40.0)
    assert close(summarize(per)["mean_mIoU"], 60.0)
