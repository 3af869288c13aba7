"""Mask2Former: the matcher against brute force, deformable attention against a naive bilinear reference, the
semantic read-out, losses that fall on the embedded data, and Rein's query link."""

import itertools

import numpy as np
import pytest
import torch

from dgss.data.synthetic import SyntheticDomain
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
    data = SyntheticDomain("game", "train", 8, 64, 64)
    batch = [data.load(i) for i in range(8)]
    images = torch.stack([im for im, _ in batch]).float() / 127.5 - 1  # a stand-in normalisation
    labels = torch.stack([lab for _, lab in batch]).long()
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
    method.configure_model()
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
        Rein(
            Backbone("vit_small_patch14_dinov2", tiny=True, img_size=64), head, num_classes=19
        ).configure_model()


TO_MMDET = [  # written out independently of dgss's map: our names -> mmdet 3.x Mask2Former names
    (r"^pixel_decoder\.(input_convs|lateral_convs|output_convs)\.(\d+)\.0\.", r"pixel_decoder.\1.\2.conv."),
    (r"^pixel_decoder\.(input_convs|lateral_convs|output_convs)\.(\d+)\.1\.", r"pixel_decoder.\1.\2.gn."),
    (r"^pixel_decoder\.layers\.(\d+)\.attn\.", r"pixel_decoder.encoder.layers.\1.self_attn."),
    (r"^pixel_decoder\.layers\.(\d+)\.ffn\.0\.", r"pixel_decoder.encoder.layers.\1.ffn.layers.0.0."),
    (r"^pixel_decoder\.layers\.(\d+)\.ffn\.3\.", r"pixel_decoder.encoder.layers.\1.ffn.layers.1."),
    (r"^pixel_decoder\.layers\.(\d+)\.norm1\.", r"pixel_decoder.encoder.layers.\1.norms.0."),
    (r"^pixel_decoder\.layers\.(\d+)\.norm2\.", r"pixel_decoder.encoder.layers.\1.norms.1."),
    (r"^layers\.(\d+)\.(self|cross)_attn\.", r"transformer_decoder.layers.\1.\2_attn.attn."),
    (r"^layers\.(\d+)\.ffn\.0\.", r"transformer_decoder.layers.\1.ffn.layers.0.0."),
    (r"^layers\.(\d+)\.ffn\.3\.", r"transformer_decoder.layers.\1.ffn.layers.1."),
    (r"^layers\.(\d+)\.norms\.", r"transformer_decoder.layers.\1.norms."),
    (r"^post_norm\.", r"transformer_decoder.post_norm."),
]


def test_an_official_rein_release_loads_and_evaluates(compose_cfg, tmp_path):
    import re

    from dgss.checkpoint import load_method
    from dgss.config import build_method
    from dgss.errors import ConfigError
    from dgss.eval import evaluate

    tiny = ["experiment=rein", "trainer=cpu", "backbone.tiny=true", "backbone.weights=null", "backbone.img_size=64",
            "head.tiny=true", "data=synthetic", "synthetic.height=64", "synthetic.width=128", "synthetic.val_length=2",
            "data.val_batch_size=2", "data.num_workers=0", "method.inference.mode=whole"]  # fmt: skip
    torch.manual_seed(0)
    trained = build_method(compose_cfg(tiny, config_name="eval"))
    with torch.no_grad():  # stand-in for training: every Rein / head tensor moves off its init
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    release = {f"backbone.reins.{k}": v for k, v in trained.reins.state_dict().items()}
    for k, v in trained.head.state_dict().items():
        for pattern, repl in TO_MMDET:
            k = re.sub(pattern, repl, k)
        release[f"decode_head.{k}"] = v
    path = tmp_path / "rein_release.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": release}, path)

    cfg = compose_cfg([f"ckpt_path={path}", *tiny], config_name="eval")
    method, _ = load_method(str(path), recipe=cfg)
    for name, t in [*trained.reins.state_dict().items()]:
        assert torch.equal(method.reins.state_dict()[name], t)
    for name, t in trained.head.state_dict().items():
        assert torch.equal(method.head.state_dict()[name], t), name
    assert "val/mean_mIoU" in evaluate(cfg)
    with pytest.raises(ConfigError, match="official release without a dgss config; add the recipe"):
        load_method(str(path))
    release.pop("decode_head.cls_embed.weight")
    torch.save({"state_dict": release}, path)
    with pytest.raises(ConfigError, match=r"decode head does not fit .*missing: cls_embed.weight"):
        load_method(str(path), recipe=cfg)
