"""Mask2Former: the matcher against brute force, deformable attention against a naive bilinear reference, the
semantic read-out, losses that fall on the embedded data, and Rein's query link."""

import itertools

import numpy as np
import pytest
import torch

from dgss.data.synthetic import SyntheticDomain
from dgss.data.transforms import TrainPipeline
from dgss.models.heads.mask2former import Mask2FormerHead
from dgss.models.heads.mask2former.criterion import hungarian, semantic_targets
from dgss.models.heads.mask2former.deform_attn import ms_deform_attn

SMALL = dict(dim=32, num_queries=12, encoder_layers=1, encoder_ffn=64, decoder_layers=3, decoder_ffn=64, num_heads=4,
             num_points=512)  # fmt: skip


@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (6, 2), (7, 5)])
def test_hungarian_equals_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(10):
        cost = torch.rand(shape, generator=gen)
        rows, cols = hungarian(cost)
        q, m = shape
        best = min(sum(float(cost[p[j], j]) for j in range(m)) for p in itertools.permutations(range(q), m))
        assert len(set(rows.tolist())) == m and sorted(cols.tolist()) == list(range(m))
        assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-6)


def _naive(value, shapes, loc, weights):
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = loc.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(b, nq, heads, d, dtype=torch.float64)
    for bi, qi, hi, li, pi in itertools.product(
        range(b), range(nq), range(heads), range(levels), range(points)
    ):
        h, w = shapes[li]
        grid = value[bi, starts[li] : starts[li + 1], hi].reshape(h, w, d).double()
        x, y = float(loc[bi, qi, hi, li, pi, 0]) * w - 0.5, float(loc[bi, qi, hi, li, pi, 1]) * h - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        acc = torch.zeros(d, dtype=torch.float64)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < w:  # zero padding outside
                acc += (1 - abs(x - xx)) * (1 - abs(y - yy)) * grid[yy, xx]
        out[bi, qi, hi] += float(weights[bi, qi, hi, li, pi]) * acc
    return out.reshape(b, nq, heads * d)


def test_deformable_attention_matches_a_naive_reference():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2), (1, 3)]
    b, nq, heads, d, points = 2, 5, 2, 3, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, d, generator=gen, dtype=torch.float64)
    loc = (
        torch.rand(b, nq, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    )  # some outside
    weights = torch.rand(b, nq, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        ms_deform_attn(value, shapes, loc, weights), _naive(value, shapes, loc, weights)
    )


def test_semantic_targets_and_read_out():
    label = torch.tensor([[0, 0, 255], [5, 5, 18]])
    classes, masks = semantic_targets(label, 19, 255)
    assert (
        classes.tolist() == [0, 5, 18] and masks.sum().item() == 5 and masks[:, 0, 2].sum() == 0
    )  # ignore: no mask
    head = Mask2FormerHead([32] * 4, 3, **SMALL)
    cls, masks = torch.randn(1, 12, 4), torch.randn(1, 12, 2, 3)
    want = torch.einsum("qc,qhw->chw", cls[0].softmax(-1)[:, :3], masks[0].sigmoid())
    torch.testing.assert_close(head.logits({"cls": [cls], "masks": [masks]}, (2, 3))[0], want)


def test_losses_are_finite_and_fall_on_the_embedded_data():
    torch.manual_seed(0)
    data = SyntheticDomain(
        "game", "train", 8, 64, 64, transform=TrainPipeline(crop=(64, 64), photometric=False, flip=0)
    )
    batch = [data[i] for i in range(8)]
    images, labels = torch.stack([s["image"] for s in batch]), torch.stack([s["label"] for s in batch])
    stem = torch.nn.Conv2d(3, 32, 4, stride=4)  # a stand-in backbone: stride-4 features, four levels
    head = Mask2FormerHead([32] * 4, 19, **{**SMALL, "pyramid": [1.0, 0.5, 0.25, 0.125]})
    opt = torch.optim.AdamW([*stem.parameters(), *head.parameters()], lr=1e-3)
    history = []
    for _ in range(40):
        f = stem(images)
        losses = head.loss(head([f, f, f, f]), labels)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5])


def test_rein_queries_become_the_head_queries():
    from dgss.methods.rein import Rein
    from dgss.models.backbone import Backbone

    bb = Backbone("vit_small_patch14_dinov2", tiny=True, img_size=64, model_kwargs={"patch_size": 16})
    head = lambda in_channels, num_classes: Mask2FormerHead(in_channels, num_classes, **SMALL)  # noqa: E731
    method = Rein(bb, head, num_classes=19, rein={"num_tokens": 7, "query_dim": 32, "lora_rank": 4})
    names = {n for n, p in method.named_parameters() if p.requires_grad}
    assert "head.querys2feat.weight" in names and "reins.merge.weight" in names
    assert not any("query_embed" in n or "query_feat" in n for n in names)  # replaced by the link
    out = method(torch.randn(2, 3, 64, 64))
    assert out["cls"][-1].shape == (2, 7, 20) and len(out["masks"]) == 4  # Rein's 7 tokens are the queries
    sum(method.head.loss(out, torch.randint(0, 19, (2, 64, 64))).values()).backward()
    assert all(p.grad is not None for n, p in method.named_parameters() if p.requires_grad)
    with pytest.raises(
        ValueError, match=r"method.rein.query_dim=256 must equal the head's width head.dim=32"
    ):
        Rein(Backbone("vit_small_patch14_dinov2", tiny=True, img_size=64), head, num_classes=19)
