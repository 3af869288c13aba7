"""Mask2Former: the matcher against brute force, deformable attention against a naive bilinear reference, the
semantic read-out, losses that fall on the embedded data, and Rein's query link."""

import itertools
import math

import numpy as np
import pytest
import torch

from dgss.data.synthetic import SyntheticDomain
from dgss.models.heads.mask2former import Mask2FormerHead
from dgss.models.heads.mask2former.criterion import BatchTargets, hungarian
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
    labels = torch.tensor([[[0, 0, 255], [5, 5, 18]], [[3, 255, 255], [255, 19, 40]]])  # 19, 40: not classes
    t = BatchTargets.build(labels, 19, 255)
    assert [c.tolist() for c in t.classes] == [[0, 5, 18], [3]] and t.ids.tolist() == [
        [0, 5, 18],
        [3, -1, -1],
    ]
    assert (
        t.masks.shape == (2, 3, 2, 3) and t.masks[0].sum() == 5 and t.masks[:, :, 0, 2].sum() == 0
    )  # ignore
    assert t.masks[1, 0].sum() == 1 and t.masks[1, 1:].sum() == 0  # padding: empty masks
    torch.testing.assert_close(t.masks[0], torch.stack([labels[0] == c for c in (0, 5, 18)]).float())
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


# ------------------------------------------------------------------------------------ official checkpoints
def official_release_keys(*, in_channels, num_classes, dim, encoder_layers, encoder_ffn, decoder_layers, decoder_ffn,
                          num_heads, num_levels, num_points, depth, embed_dim, num_tokens, lora_rank):  # fmt: skip
    """Names and shapes of every tensor in an official Rein release (mmseg 1.x EncoderDecoder: ``backbone.reins.*``
    and ``decode_head.*``), written from the official sources, not from dgss:

    - w1oves/Rein ``rein/models/backbones/reins.py``: ``LoRAReins`` holds ``learnable_tokens_a`` (L, T, r),
      ``learnable_tokens_b`` (L, r, C), ``scale``, ``mlp_token2feat``, ``mlp_delta_f``; with
      ``link_token_to_query``: ``transform`` (C -> Q) and ``merge`` (3Q -> Q).
    - w1oves/Rein ``rein/models/heads/rein_mask2former.py``: ``ReinMask2FormerHead`` deletes ``query_embed``; with
      ``replace_query_feat`` deletes ``query_feat`` and adds ``querys2feat`` (Q -> Q); ``vpt_transforms`` is empty.
    - mmdet ``dense_heads/mask2former_head.py``: ``decoder_input_projs`` are Identity when the pixel decoder's
      width equals the decoder's; ``level_embed``, ``cls_embed`` (K + 1), ``mask_embed`` = Linear, ReLU, Linear,
      ReLU, Linear (0, 2, 4).
    - mmdet ``layers/msdeformattn_pixel_decoder.py``: ``input_convs`` = ConvModule(conv ``bias=True``, ``gn``), one
      per encoder level from the coarsest input down; ``level_encoding``; ``lateral_convs`` / ``output_convs`` =
      ConvModule without conv bias (a norm follows), from the coarsest remaining input down; ``mask_feature``
      (a biased 1x1 conv).
    - mmdet ``DeformableDetrTransformerEncoderLayer``: ``self_attn`` (mmcv ``MultiScaleDeformableAttention``:
      ``sampling_offsets`` heads·levels·points·2, ``attention_weights`` heads·levels·points, ``value_proj``,
      ``output_proj``), ``ffn`` (mmcv ``FFN``: ``layers.0.0`` Linear in a Sequential with the activation, then
      ``layers.1``), ``norms.0`` / ``norms.1``.
    - mmdet ``layers/transformer/mask2former_layers.py``: decoder layers with ``self_attn.attn`` /
      ``cross_attn.attn`` (torch ``nn.MultiheadAttention`` inside mmcv's wrapper), ``ffn``, ``norms.0/1/2``;
      the decoder's ``post_norm``.
    """
    keys: dict[str, tuple] = {}

    def linear(name, cin, cout, bias=True):
        keys[f"{name}.weight"] = (cout, cin)
        if bias:
            keys[f"{name}.bias"] = (cout,)

    def norm(name, c):
        keys[f"{name}.weight"] = keys[f"{name}.bias"] = (c,)

    def conv_module(name, cin, cout, k, bias):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k)
        if bias:
            keys[f"{name}.conv.bias"] = (cout,)
        norm(f"{name}.gn", cout)

    def mha(name, c):
        keys[f"{name}.in_proj_weight"], keys[f"{name}.in_proj_bias"] = (3 * c, c), (3 * c,)
        linear(f"{name}.out_proj", c, c)

    r = "backbone.reins"
    keys[f"{r}.learnable_tokens_a"] = (depth, num_tokens, lora_rank)
    keys[f"{r}.learnable_tokens_b"] = (depth, lora_rank, embed_dim)
    keys[f"{r}.scale"] = ()
    linear(f"{r}.mlp_token2feat", embed_dim, embed_dim)
    linear(f"{r}.mlp_delta_f", embed_dim, embed_dim)
    linear(f"{r}.transform", embed_dim, dim)
    linear(f"{r}.merge", 3 * dim, dim)

    pd, n = "decode_head.pixel_decoder", len(in_channels)
    for j, i in enumerate(range(n - 1, n - num_levels - 1, -1)):
        conv_module(f"{pd}.input_convs.{j}", in_channels[i], dim, 1, bias=True)
    for layer in range(encoder_layers):
        e = f"{pd}.encoder.layers.{layer}"
        linear(f"{e}.self_attn.sampling_offsets", dim, num_heads * num_levels * num_points * 2)
        linear(f"{e}.self_attn.attention_weights", dim, num_heads * num_levels * num_points)
        linear(f"{e}.self_attn.value_proj", dim, dim)
        linear(f"{e}.self_attn.output_proj", dim, dim)
        linear(f"{e}.ffn.layers.0.0", dim, encoder_ffn)
        linear(f"{e}.ffn.layers.1", encoder_ffn, dim)
        norm(f"{e}.norms.0", dim)
        norm(f"{e}.norms.1", dim)
    keys[f"{pd}.level_encoding.weight"] = (num_levels, dim)
    for j, i in enumerate(range(n - num_levels - 1, -1, -1)):
        conv_module(f"{pd}.lateral_convs.{j}", in_channels[i], dim, 1, bias=False)
        conv_module(f"{pd}.output_convs.{j}", dim, dim, 3, bias=False)
    keys[f"{pd}.mask_feature.weight"], keys[f"{pd}.mask_feature.bias"] = (dim, dim, 1, 1), (dim,)

    td = "decode_head.transformer_decoder"
    for layer in range(decoder_layers):
        d = f"{td}.layers.{layer}"
        mha(f"{d}.self_attn.attn", dim)
        mha(f"{d}.cross_attn.attn", dim)
        linear(f"{d}.ffn.layers.0.0", dim, decoder_ffn)
        linear(f"{d}.ffn.layers.1", decoder_ffn, dim)
        for k in range(3):
            norm(f"{d}.norms.{k}", dim)
    norm(f"{td}.post_norm", dim)
    linear("decode_head.querys2feat", dim, dim)
    keys["decode_head.level_embed.weight"] = (num_levels, dim)
    linear("decode_head.cls_embed", dim, num_classes + 1)
    for k in (0, 2, 4):
        linear(f"decode_head.mask_embed.{k}", dim, dim)
    return keys


def random_release(keys: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}


HEAD = dict(dim=64, encoder_layers=2, encoder_ffn=96, decoder_layers=3, decoder_ffn=128, num_heads=4,
            num_points_deform=2)  # fmt: skip


def test_official_mask2former_names_land_where_the_official_forward_uses_them():
    """Every tensor of an official decode head (names from mmdet's source, above) lands in the dgss module doing
    the same job: strictly, shape-checked (distinct widths per input level, per FFN), each tensor exactly once."""
    from dgss.models.heads.mask2former.official import load_official_head

    in_channels = [32, 48, 80, 96]  # finest first: the shapes tell the levels apart
    head = Mask2FormerHead(in_channels, 5, **HEAD)
    head.link(7)
    keys = official_release_keys(in_channels=in_channels, num_classes=5, dim=64, encoder_layers=2, encoder_ffn=96,
                                 decoder_layers=3, decoder_ffn=128, num_heads=4, num_levels=3, num_points=2,
                                 depth=1, embed_dim=8, num_tokens=7, lora_rank=2)  # fmt: skip
    release = {k: v for k, v in random_release(keys).items() if k.startswith("decode_head.")}
    load_official_head(head, {"state_dict": release})
    ours = head.state_dict()
    landed = {
        k: [n for n, t in ours.items() if t.shape == v.shape and torch.equal(t, v)]
        for k, v in release.items()
    }
    assert all(len(v) == 1 for v in landed.values()) and len(ours) == len(release)  # a bijection
    where = {k.removeprefix("decode_head."): v[0] for k, v in landed.items()}
    pd = head.pixel_decoder
    # mmdet: input_convs[0] projects the coarsest input (in_channels[-1]); the deformable encoder applies norms[0]
    # after self-attention and norms[1] after the FFN (DeformableDetrTransformerEncoderLayer.forward)
    assert pd.input_convs[0][0].weight.shape[1] == 96 and pd.input_convs[2][0].weight.shape[1] == 48
    assert torch.equal(
        pd.input_convs[0][0].bias, release["decode_head.pixel_decoder.input_convs.0.conv.bias"]
    )
    assert pd.lateral_convs[0][0].weight.shape[1] == 32
    for layer in range(2):
        e = f"pixel_decoder.encoder.layers.{layer}"
        assert where[f"{e}.norms.0.weight"] == f"pixel_decoder.layers.{layer}.norm1.weight"
        assert where[f"{e}.norms.1.weight"] == f"pixel_decoder.layers.{layer}.norm2.weight"
    assert torch.equal(head.level_embed.weight, release["decode_head.level_embed.weight"])
    assert torch.equal(pd.level_encoding.weight, release["decode_head.pixel_decoder.level_encoding.weight"])


def mmdet_decoder_layer(sd: dict, prefix: str, q, q_pos, memory, m_pos, attn_mask, num_heads: int):
    """mmdet's ``Mask2FormerTransformerDecoderLayer.forward`` on official tensors: cross-attention -> norms[0] ->
    self-attention -> norms[1] -> FFN -> norms[2]; mmcv's MultiheadAttention adds the positions to query and key
    (not the value) and the identity; mmcv's FFN adds the identity (``add_identity=True``)."""
    import torch.nn.functional as F

    def mha(name, query, key, value, mask=None):
        out, _ = F.multi_head_attention_forward(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), q.shape[-1], num_heads,
            sd[f"{name}.in_proj_weight"], sd[f"{name}.in_proj_bias"], None, None, False, 0.0,
            sd[f"{name}.out_proj.weight"], sd[f"{name}.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)  # fmt: skip
        return out.transpose(0, 1)

    def ln(name, x):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    p = prefix
    mask = attn_mask.repeat_interleave(num_heads, 0)  # (B·heads, Q, HW), as mmdet passes it
    q = ln(f"{p}.norms.0", q + mha(f"{p}.cross_attn.attn", q + q_pos, memory + m_pos, memory, mask))
    q = ln(f"{p}.norms.1", q + mha(f"{p}.self_attn.attn", q + q_pos, q + q_pos, q))
    hidden = F.relu(F.linear(q, sd[f"{p}.ffn.layers.0.0.weight"], sd[f"{p}.ffn.layers.0.0.bias"]))
    return ln(
        f"{p}.norms.2", q + F.linear(hidden, sd[f"{p}.ffn.layers.1.weight"], sd[f"{p}.ffn.layers.1.bias"])
    )


def test_an_official_decoder_layer_computes_what_mmdet_computes():
    """The same-shaped tensors (three norms, two attentions) are told apart by the computation: an official
    decoder layer loaded into dgss gives mmdet's output."""
    from dgss.models.heads.mask2former.official import load_official_head

    head = Mask2FormerHead([64] * 4, 5, **HEAD)
    head.link(7)
    keys = official_release_keys(in_channels=[64] * 4, num_classes=5, dim=64, encoder_layers=2, encoder_ffn=96,
                                 decoder_layers=3, decoder_ffn=128, num_heads=4, num_levels=3, num_points=2,
                                 depth=1, embed_dim=8, num_tokens=7, lora_rank=2)  # fmt: skip
    release = {k: v.double() for k, v in random_release(keys, seed=1).items() if k.startswith("decode_head.")}
    head.double()
    norms = [k for k in release if ".norms." in k and k.startswith("decode_head.transformer_decoder")]
    for k in norms:  # distinct, far-from-identity norms so a swap shows
        release[k] = release[k] * 3 + (1.0 if k.endswith("weight") else 0.0)
    load_official_head(head, {"state_dict": release})
    gen = torch.Generator().manual_seed(2)
    q, q_pos, memory, m_pos = (
        torch.randn(2, n, 64, generator=gen, dtype=torch.float64) for n in (7, 7, 12, 12)
    )
    attn_mask = torch.rand(2, 7, 12, generator=gen) < 0.3
    sd = {k.removeprefix("decode_head.transformer_decoder."): v for k, v in release.items()}
    with torch.no_grad():
        for layer in range(3):
            want = mmdet_decoder_layer(sd, f"layers.{layer}", q, q_pos, memory, m_pos, attn_mask, num_heads=4)
            got = head.layers[layer](q, q_pos, memory, m_pos, attn_mask.repeat_interleave(4, 0))
            torch.testing.assert_close(got, want)


def test_an_official_rein_release_loads_and_evaluates(compose_cfg, tmp_path):
    from dgss.config import build_method
    from dgss.errors import ConfigError
    from dgss.eval import evaluate
    from dgss.restore import load_method

    tiny = ["experiment=rein", "trainer=cpu", "backbone.tiny=true", "backbone.weights=null", "backbone.img_size=64",
            "head.tiny=true", "data=synthetic", "synthetic.height=64", "synthetic.width=128", "synthetic.val_length=2",
            "data.val_batch_size=2", "data.num_workers=0", "method.inference.mode=whole"]  # fmt: skip
    trained = build_method(compose_cfg(tiny, config_name="eval"))  # only its sizes are read
    head, reins = trained.head, trained.reins
    keys = official_release_keys(
        in_channels=[trained.backbone.embed_dim] * 4,
        num_classes=19,
        dim=head.dim,
        encoder_layers=1,
        encoder_ffn=256,
        decoder_layers=3,
        decoder_ffn=256,
        num_heads=8,
        num_levels=3,
        num_points=4,
        depth=reins.num_layers,
        embed_dim=reins.embed_dim,
        num_tokens=reins.num_tokens,
        lora_rank=reins.lora_rank,
    )
    release = random_release(keys)  # official names (from the official source), values that are not dgss's
    path = tmp_path / "rein_release.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": release}, path)

    cfg = compose_cfg([f"ckpt_path={path}", *tiny], config_name="eval")
    method, _ = load_method(str(path), recipe=cfg)
    ours = {**{f"backbone.reins.{k}": v for k, v in method.reins.state_dict().items()},
            **{f"head.{k}": v for k, v in method.head.state_dict().items()}}  # fmt: skip
    for name, t in release.items():  # every official tensor arrived, once
        assert sum(torch.equal(v, t) for v in ours.values() if v.shape == t.shape) == 1, name
    assert len(ours) == len(release)
    assert torch.equal(method.reins.learnable_tokens_a, release["backbone.reins.learnable_tokens_a"])
    assert "val/mean_mIoU" in evaluate(cfg)
    with pytest.raises(ConfigError, match="official release without a dgss config; add the recipe"):
        load_method(str(path))
    release.pop("decode_head.cls_embed.weight")
    torch.save({"state_dict": release}, path)
    with pytest.raises(ConfigError, match=r"decode head does not fit .*missing: cls_embed.weight"):
        load_method(str(path), recipe=cfg)


def mmdet_single_layer_losses(cls_logits, mask_logits, assignment, points, num_classes, class_weight,
                              weights=(2.0, 5.0, 5.0)):  # fmt: skip
    """mmdet 3.x ``Mask2FormerHead._loss_by_feat_single`` (re-derived from its source, float64) for a given
    matching (``assignment[i] = (query rows, target classes, target masks)`` per image, from the same Hungarian
    matcher) and given importance-sampled points (N_gt, P, 2). Class: CrossEntropyLoss with ``class_weight`` and
    ``avg_factor = class_weight[labels].sum()``; ``num_total_masks = max(reduce_mean(Σ_i SamplingResult.avg_factor),
    1)`` with ``avg_factor = max(num_pos, 1)`` (MaskPseudoSampler); mask: sigmoid CE over points with ``avg_factor =
    num_total_masks · num_points``; Dice: naive Dice (eps 1) with ``avg_factor = num_total_masks``."""
    cls_logits, mask_logits = cls_logits.double(), mask_logits.double()
    b, q, _ = cls_logits.shape
    labels = torch.full((b, q), num_classes, dtype=torch.long)
    preds, tgts, avg = [], [], 0
    for i, (rows, classes, masks) in enumerate(assignment):
        labels[i, rows] = classes
        preds.append(mask_logits[i, rows])
        tgts.append(masks.double())
        avg += max(len(rows), 1)
    w = class_weight.double()
    ce = -cls_logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    loss_cls = (w[labels] * ce).sum() / w[labels].sum()
    num_total_masks = max(avg, 1)
    pred, tgt = torch.cat(preds)[:, None], torch.cat(tgts)[:, None]
    grid = 2 * points[:, :, None].double() - 1  # mmcv point_sample: grid_sample, align_corners=False
    p = torch.nn.functional.grid_sample(pred, grid, align_corners=False)[:, 0, :, 0]
    t = torch.nn.functional.grid_sample(tgt, grid, align_corners=False)[:, 0, :, 0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(p, t, reduction="none")
    loss_mask = bce.sum() / (num_total_masks * points.shape[1])
    s = p.sigmoid()
    dice = 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1)
    loss_dice = dice.sum() / num_total_masks
    return {
        "loss_cls": weights[0] * loss_cls,
        "loss_mask": weights[1] * loss_mask,
        "loss_dice": weights[2] * loss_dice,
    }


def test_set_losses_equal_mmdet_including_an_image_with_nothing_labelled(monkeypatch):
    """A batch whose second image is all ignore: mmdet counts it once in the mask normaliser (max(0, 1)); dividing
    by the matched count alone would make both mask losses (3 + 1 + 2) / (3 + 2) = 1.2 x larger."""
    from dgss.models.heads.mask2former import criterion as crit

    torch.manual_seed(0)
    num_classes, q, h, w = 5, 7, 12, 16
    labels = torch.full((3, 4 * h, 4 * w), 255, dtype=torch.long)
    labels[0, :20], labels[0, 20:40], labels[0, 40:] = 0, 3, 4
    labels[2, :, :30], labels[2, :, 30:] = 1, 2
    cls_logits, mask_logits = torch.randn(3, q, num_classes + 1), torch.randn(3, q, h, w)
    seen: dict = {"match": [], "points": None}
    real_assign, real_points = crit.assign, crit.uncertain_points

    def assign(cost):
        seen["match"].append(tuple(torch.as_tensor(a) for a in real_assign(cost)))
        return seen["match"][-1][0].numpy(), seen["match"][-1][1].numpy()

    def points(*args, **kwargs):
        seen["points"] = real_points(*args, **kwargs)
        return seen["points"]

    monkeypatch.setattr(crit, "assign", assign)
    monkeypatch.setattr(crit, "uncertain_points", points)
    criterion = crit.SetCriterion(num_classes, num_points=64)
    got = criterion(cls_logits, mask_logits, labels)
    # the reference's assignment from the same matcher: (rows, classes[cols], masks[cols]) per image; the empty image
    # contributes no matching (one cost matrix per labelled image, in image order), the reference sees it with no rows
    found = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != 255]
        found.append((classes, (lab[None] == classes[:, None, None]).float()))
    assert len(seen["match"]) == 2
    (r0, c0), (r2, c2) = seen["match"]
    assignment = [(r0, found[0][0][c0], found[0][1][c0]),
                  (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4 * h, 4 * w)),
                  (r2, found[2][0][c2], found[2][1][c2])]  # fmt: skip
    want = mmdet_single_layer_losses(cls_logits, mask_logits, assignment, seen["points"], num_classes,
                                     criterion.class_weight)  # fmt: skip
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6, msg=k)
    # the rule that differs from dividing by the matched count: 3 + 1 + 2 = 6 images' worth, not 5
    assert sum(max(len(a[0]), 1) for a in assignment) == 6 and sum(len(a[0]) for a in assignment) == 5


def _small_head(num_classes: int, num_queries: int = 100):
    return Mask2FormerHead([32] * 4, num_classes=num_classes, dim=32, num_heads=4, encoder_layers=1,
                           encoder_ffn=64, decoder_layers=3, decoder_ffn=64, num_points=64,
                           num_queries=num_queries)  # fmt: skip


@pytest.mark.parametrize(
    "case", ["an_image_unlabelled", "more_classes_than_queries", "nothing_labelled", "bf16_autocast"]
)
def test_the_whole_step_criterion_equals_the_per_layer_one_in_losses_and_every_gradient(case):
    """Issue 26 (1): every layer matched and scored together (one host copy of the classes present, one of all cost
    matrices, one of all matches back) gives the losses and gradients of the per-layer criterion it replaced
    (``tests/helpers/per_layer_criterion.py``, one ``torch.unique`` per image and two host round trips per layer)
    from the same random draws in the same order, within rtol 1e-6 (gradient elements that cancel to near zero:
    within 1e-6 of the largest gradient): an image with nothing labelled, more classes
    than queries (not every target matched), a batch with nothing labelled, and under bf16 autocast."""
    from helpers.per_layer_criterion import SetCriterion as PerLayer
    from helpers.per_layer_criterion import per_layer_head_loss

    torch.manual_seed(0)
    num_classes, queries = (12, 5) if case == "more_classes_than_queries" else (6, 100)
    head = _small_head(num_classes, queries)
    feats = [torch.randn(3, 32, 8, 8, requires_grad=True) for _ in range(4)]
    labels = torch.randint(0, num_classes, (3, 128, 128))
    labels[0, :10] = 255
    if case != "more_classes_than_queries":
        labels[1] = 255
    if case == "nothing_labelled":
        labels[:] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast"):
        output = head(feats)
        torch.manual_seed(1)
        want = per_layer_head_loss(PerLayer(num_classes, num_points=64), output, labels)
        next_want = torch.rand(())
        torch.manual_seed(1)
        got = head.loss(output, labels)
        next_got = torch.rand(())
    assert next_got == next_want  # the same number of draws: the generator is where the per-layer one left it
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    params = [*feats, *(p for p in head.parameters() if p.requires_grad)]
    g_want = torch.autograd.grad(sum(want.values()), params, retain_graph=True, allow_unused=True)
    g_got = torch.autograd.grad(sum(got.values()), params, allow_unused=True)
    # rtol 1e-6; elements that cancel to near zero (attention key biases, whose true gradient is 0) within 1e-6 of
    # the largest gradient element
    scale = max(float(a.abs().max()) for a in g_want if a is not None)
    for a, b in zip(g_want, g_got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * scale)


def mmdet_init_weights(sd: dict, *, num_inputs: int, num_levels: int, encoder_layers: int, decoder_layers: int,
                       num_heads: int, num_points: int) -> None:  # fmt: skip
    """mmdet 3.x ``Mask2FormerHead.init_weights`` (re-derived from its source; mmengine's init helpers spelled out) on
    official-named tensors, in place: ``decoder_input_projs`` are Identity at equal widths; the pixel decoder's
    ``init_weights``; then xavier-normal on every ``transformer_decoder`` tensor with dim > 1, in parameter order."""
    pd, td = "decode_head.pixel_decoder", "decode_head.transformer_decoder"
    for i in range(num_levels):  # xavier_init(conv, gain=1, bias=0, distribution='uniform')
        torch.nn.init.xavier_uniform_(sd[f"{pd}.input_convs.{i}.conv.weight"], gain=1)
        torch.nn.init.constant_(sd[f"{pd}.input_convs.{i}.conv.bias"], 0)
    for i in range(
        num_inputs - num_levels
    ):  # caffe2_xavier_init = kaiming_init(a=1, fan_in, leaky_relu, uniform)
        for name in (f"{pd}.lateral_convs.{i}.conv", f"{pd}.output_convs.{i}.conv"):
            torch.nn.init.kaiming_uniform_(
                sd[f"{name}.weight"], a=1, mode="fan_in", nonlinearity="leaky_relu"
            )
    torch.nn.init.kaiming_uniform_(
        sd[f"{pd}.mask_feature.weight"], a=1, mode="fan_in", nonlinearity="leaky_relu"
    )
    torch.nn.init.constant_(sd[f"{pd}.mask_feature.bias"], 0)
    torch.nn.init.normal_(sd[f"{pd}.level_encoding.weight"], 0, 1)
    enc = [k for k in sd if k.startswith(f"{pd}.encoder.")]  # encoder.parameters(): module construction order
    order = ["self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
             "self_attn.output_proj", "ffn.layers.0.0", "ffn.layers.1", "norms.0", "norms.1"]  # fmt: skip
    for layer in range(encoder_layers):
        for part in order:
            for suffix in ("weight", "bias"):
                k = f"{pd}.encoder.layers.{layer}.{part}.{suffix}"
                assert k in enc
                if sd[k].dim() > 1:
                    torch.nn.init.xavier_normal_(sd[k])
    for layer in range(encoder_layers):  # mmcv MultiScaleDeformableAttention.init_weights
        a = f"{pd}.encoder.layers.{layer}.self_attn"
        torch.nn.init.constant_(sd[f"{a}.sampling_offsets.weight"], 0)
        thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2).repeat(1, num_levels,
                                                                                              num_points, 1)  # fmt: skip
        for i in range(num_points):
            grid[:, :, i, :] *= i + 1
        sd[f"{a}.sampling_offsets.bias"].copy_(grid.view(-1))
        torch.nn.init.constant_(sd[f"{a}.attention_weights.weight"], 0)
        torch.nn.init.constant_(sd[f"{a}.attention_weights.bias"], 0)
        for proj in ("value_proj", "output_proj"):
            torch.nn.init.xavier_uniform_(sd[f"{a}.{proj}.weight"])
            torch.nn.init.constant_(sd[f"{a}.{proj}.bias"], 0)
    dec = ["self_attn.attn.in_proj_weight", "self_attn.attn.in_proj_bias", "self_attn.attn.out_proj.weight",
           "self_attn.attn.out_proj.bias", "cross_attn.attn.in_proj_weight", "cross_attn.attn.in_proj_bias",
           "cross_attn.attn.out_proj.weight", "cross_attn.attn.out_proj.bias", "ffn.layers.0.0.weight",
           "ffn.layers.0.0.bias", "ffn.layers.1.weight", "ffn.layers.1.bias"]  # fmt: skip
    for layer in range(decoder_layers):
        for part in dec:
            t = sd[f"{td}.layers.{layer}.{part}"]
            if t.dim() > 1:
                torch.nn.init.xavier_normal_(t)


def test_a_new_head_starts_where_mmdet_init_weights_puts_it():
    """From the same tensors and the same seed, dgss's init gives mmdet's tensors exactly (names mapped by the
    official key list above); tensors mmdet leaves alone stay bit-identical."""
    from dgss.models.heads.mask2former.official import mmdet_to_dgss

    in_channels = [32, 48, 80, 96]
    head = Mask2FormerHead(in_channels, 5, **HEAD)
    head.link(7)
    keys = official_release_keys(in_channels=in_channels, num_classes=5, dim=64, encoder_layers=2, encoder_ffn=96,
                                 decoder_layers=3, decoder_ffn=128, num_heads=4, num_levels=3, num_points=2,
                                 depth=1, embed_dim=8, num_tokens=7, lora_rank=2)  # fmt: skip
    keys = [k for k in keys if k.startswith("decode_head.")]
    with torch.no_grad():
        for p in head.parameters():  # a state that no init rule produces
            p.uniform_(5, 6)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    name = {k: next(iter(mmdet_to_dgss({k: None}))) for k in keys}
    theirs = {k: before[name[k]].clone() for k in keys}
    torch.manual_seed(123)
    with torch.no_grad():
        mmdet_init_weights(theirs, num_inputs=4, num_levels=3, encoder_layers=2, decoder_layers=3, num_heads=4,
                           num_points=2)  # fmt: skip
    torch.manual_seed(123)
    with torch.no_grad():
        head.reset_parameters()
    ours = head.state_dict()
    for k in keys:
        assert torch.equal(ours[name[k]], theirs[k]), k
    untouched = [k for k in keys if torch.equal(theirs[k], before[name[k]])]
    assert "decode_head.cls_embed.weight" in untouched and "decode_head.querys2feat.weight" in untouched
    assert "decode_head.transformer_decoder.layers.0.ffn.layers.0.0.bias" in untouched
    assert not torch.equal(
        ours["pixel_decoder.layers.0.ffn.0.weight"], before["pixel_decoder.layers.0.ffn.0.weight"]
    )


def test_matching_costs_are_float32_with_autocast_off():
    """Issue 26 (2): under bf16 autocast the cost matmuls ran in bf16, so the matches could differ from the official
    matcher's (float32). The costs under CPU bf16 autocast equal a float32 computation of the same inputs and
    points, bit for bit, and differ from the same formula evaluated in bf16."""
    from dgss.models.heads.mask2former.criterion import SetCriterion, bce_cost, dice_cost, point_sample

    torch.manual_seed(0)
    crit = SetCriterion(19, num_points=256)
    cls_logits, mask_logits = torch.randn(10, 20), torch.randn(10, 16, 16) * 3
    classes = torch.tensor([1, 4, 7])
    masks = (torch.rand(3, 16, 16) > 0.5).float()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit.cost(cls_logits, mask_logits, classes, masks)
    torch.manual_seed(1)
    want = crit.cost(cls_logits, mask_logits, classes, masks)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.manual_seed(
        1
    )  # the same formula with its matmuls in bf16 (what autocast did before) is not the same
    points = torch.rand(1, 256, 2)
    pred = point_sample(mask_logits, points.expand(10, -1, -1))
    tgt = point_sample(masks, points.expand(3, -1, -1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = (
            -2.0 * cls_logits.softmax(-1)[:, classes] + 5.0 * bce_cost(pred, tgt) + 5.0 * dice_cost(pred, tgt)
        )
    assert not torch.equal(low.float(), want)


def test_position_encodings_reference_points_and_level_sizes_are_made_once_per_input_size():
    """Issue 26 (4): what depends only on the feature maps' size is made on the first forward at that size (the level
    sizes were a blocking host-to-device copy in every deformable-attention layer); a second size gets its own; the
    cached tensors equal fresh ones, and a training step may use what an inference-mode forward made."""
    from dgss.models.heads.mask2former.pixel_decoder import PixelDecoder, sine_position_encoding

    torch.manual_seed(0)
    head = Mask2FormerHead([32] * 4, 19, **SMALL)
    feats = [torch.randn(2, 32, 8, 8) for _ in range(4)]
    with torch.inference_mode():
        head(feats)  # a validation first
    cached = {k: v for k, v in head.pixel_decoder.__dict__["_size_cache"].items()}
    out = head(feats)  # then a training forward: the cached tensors serve it
    out["masks"][-1].sum().backward()
    assert head.pixel_decoder.__dict__["_size_cache"].keys() == cached.keys()
    kinds = sorted(k[0] for k in cached)
    assert kinds == ["PixelDecoder.reference_points"] + ["sine_position_encoding"] * 3
    for (name, args, kwargs), t in cached.items():
        fresh = (PixelDecoder.reference_points(*args) if name == "PixelDecoder.reference_points"
                 else sine_position_encoding(*args, **dict(kwargs)))  # fmt: skip
        assert torch.equal(t, fresh) and not t.is_inference() and not t.requires_grad
    attn = head.pixel_decoder.layers[0].attn
    assert len(attn.__dict__["_size_cache"]) == 1
    head([torch.randn(2, 32, 4, 6) for _ in range(4)])  # another size: its own entries
    assert len(attn.__dict__["_size_cache"]) == 2 and len(head.pixel_decoder.__dict__["_size_cache"]) == 8
