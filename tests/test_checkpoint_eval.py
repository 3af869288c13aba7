"""Train -> checkpoint (frozen backbone tensors dropped) -> dgss-eval re-attaches them and reproduces the metrics."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.runs import DATA, RUN, backbone_args
from omegaconf import OmegaConf

from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.restore import load_method
from dgss.train import train


def test_frozen_checkpoint_holds_only_trained_tensors_and_eval_reproduces(compose_cfg, tmp_path, weights):
    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=frozen"])
    metrics = train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])  # only the head was trained
    assert any(k.startswith("head.") for k in ckpt["state_dict"])
    assert (
        ckpt["dgss"]["backbone"]["weights"] == str(weights)
        and len(ckpt["dgss"]["backbone"]["weights_sha256"]) == 64
    )

    ecfg = compose_cfg([f"ckpt_path={ckpt_path}", "trainer=cpu"], config_name="eval")
    again = evaluate(ecfg)
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/fog/mIoU"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-9), k

    # the frozen backbone must be the same file: another file is refused by hash
    other = tmp_path / "other.pth"
    sd = torch.load(weights)
    sd["blocks.0.mlp.fc1.bias"] += 1
    torch.save(sd, other)
    with pytest.raises(ConfigError, match="is not the file this checkpoint was trained with"):
        load_method(str(ckpt_path), backbone_weights=str(other))


def test_full_checkpoint_keeps_backbone_and_eval_other_targets(compose_cfg, tmp_path, weights):
    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"])
    train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert any(k.startswith("backbone.model.blocks.0") for k in ckpt["state_dict"])
    method, saved = load_method(str(ckpt_path))
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(method.state_dict()[k], v), k
    assert OmegaConf.select(saved, "backbone.weights") == str(weights)
    ecfg = compose_cfg([f"ckpt_path={ckpt_path}", "trainer=cpu", "data=synthetic", "synthetic.height=64",
                        "synthetic.width=128", "synthetic.val_length=2", "~data.targets.night"], config_name="eval")  # fmt: skip
    out = evaluate(ecfg)
    assert "val/night/mIoU" not in out and "val/photo/mIoU" in out


def test_eval_with_wrong_num_classes_is_refused(compose_cfg, tmp_path, weights):
    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"])
    train(cfg)
    ecfg = compose_cfg([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", "data=synthetic",
                        "synthetic.val_length=1", "data.num_classes=5", "data._convert_=all"], config_name="eval")  # fmt: skip
    with pytest.raises(
        ConfigError, match="the data has 5 classes but the model was built for num_classes=19"
    ):
        evaluate(ecfg)


def test_predict_writes_palettised_masks_overlays_and_label_ids(compose_cfg, tmp_path, weights):
    import numpy as np
    from PIL import Image

    from dgss.data.classes import CITYSCAPES_PALETTE
    from dgss.data.synthetic import render_sample
    from dgss.data.transforms import TestPipeline
    from dgss.predict import predict

    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"])
    train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    src = tmp_path / "street"
    for i, rel in enumerate(["a.png", "sub/b.jpg"]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(render_sample("photo", i, 50, 90, 0)[0])).save(src / rel)
    out = tmp_path / "pred"
    pcfg = compose_cfg([f"ckpt_path={ckpt_path}", f"input={src}", f"output={out}", "label_ids=true",
                        "progress=false", "device=cpu"], config_name="predict")  # fmt: skip
    assert predict(pcfg)["images"] == 2
    method, _ = load_method(str(ckpt_path))
    method.eval()
    rgb = np.array(Image.open(src / "a.png").convert("RGB"))
    x, _ = TestPipeline()(torch.from_numpy(rgb).permute(2, 0, 1), torch.zeros(50, 90))
    with torch.no_grad():
        want = method.predict_logits(x[None], (50, 90))[0].argmax(0).numpy()
    mask = Image.open(out / "masks/a.png")
    assert mask.mode == "P" and np.array_equal(np.array(mask), want)  # pixel values are the trainIds
    assert mask.getpalette()[:6] == [*CITYSCAPES_PALETTE[0], *CITYSCAPES_PALETTE[1]]
    assert Image.open(out / "overlays/sub/b.jpg").size == (90, 50) and (out / "masks/sub/b.png").is_file()
    ids = np.array(Image.open(out / "label_ids/a.png"))
    assert np.array_equal(ids[want == 13], np.full((want == 13).sum(), 26))  # car: trainId 13 -> labelId 26
    with pytest.raises(ConfigError, match="holds no images"):
        predict(compose_cfg([f"ckpt_path={ckpt_path}", f"input={out / 'nothing'}"], config_name="predict")
                if (out / "nothing").mkdir() is None else None)  # fmt: skip


def test_predict_writes_the_acdc_server_upload_and_refuses_what_it_cannot_score(
    compose_cfg, tmp_path, weights
):
    """``submission=acdc``: the layout of the ACDC submissions of Refign (ACDC's authors: ``predict_step`` saves
    ``Image.fromarray(argmax.astype(uint8))`` under each test image's own file name, flat, at the original 1080×1920)
    and of mmseg's ``format_results(to_label_id=False)`` (DAFormer / HRDA / MIC: ``<basename>.png``, flat, trainIds):
    one single-channel trainId PNG per test image, named as the image, 1920×1080; zipped at the archive's root."""
    import zipfile

    import numpy as np
    from PIL import Image

    from dgss.data.synthetic import render_sample
    from dgss.data.transforms import TestPipeline
    from dgss.predict import predict

    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"])
    train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"

    def photo(path: Path, i: int, w: int = 1920, h: int = 1080) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(np.asarray(render_sample("photo", i, 54, 96, 0)[0]))
        small.resize((w, h), Image.NEAREST).save(path)

    test = tmp_path / "acdc/rgb_anon"
    names = {"fog/test/GP010475/GP010475_frame_000041_rgb_anon.png": 0,
             "night/test/GOPR0355/GOPR0355_frame_000140_rgb_anon.png": 1}  # fmt: skip
    for rel, i in names.items():
        photo(test / rel, i)
    out = tmp_path / "pred"
    run = lambda src, dst, *more: predict(compose_cfg([f"ckpt_path={ckpt_path}", f"input={src}", f"output={dst}",  # noqa: E731
                                                       "progress=false", "device=cpu", *more], config_name="predict"))  # fmt: skip
    result = run(test, out, "submission=acdc")
    assert result["images"] == 2 and result["submission"] == str(out / "acdc.zip")
    method, _ = load_method(str(ckpt_path))
    method.eval()
    for rel in names:
        name = Path(rel).name
        sub = Image.open(out / "acdc" / name)
        assert sub.mode == "L" and sub.size == (1920, 1080) and sub.format == "PNG"
        rgb = np.array(Image.open(test / rel).convert("RGB"))
        x, _ = TestPipeline()(torch.from_numpy(rgb).permute(2, 0, 1), torch.zeros(1080, 1920))
        with torch.no_grad():
            want = method.predict_logits(x[None], (1080, 1920))[0].argmax(0).numpy()
        assert np.array_equal(np.array(sub), want) and want.max() <= 18  # the trainIds themselves, road = 0
    with zipfile.ZipFile(out / "acdc.zip") as z:
        assert sorted(z.namelist()) == sorted(Path(r).name for r in names)  # flat, at the root
        for n in z.namelist():
            assert z.read(n) == (out / "acdc" / n).read_bytes()

    # refused in one line before anything is written: each case in its own input folder
    def refused(files: dict[str, tuple[int, int]], match: str, under: str = "") -> None:
        src = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
        for rel, (w, h) in files.items():
            photo(src / rel, 0, w, h)
        with pytest.raises(ConfigError, match=match):
            run(src / under, tmp_path / f"{src.name}_out", "submission=acdc")
        assert not (tmp_path / f"{src.name}_out").exists()

    full = (1920, 1080)
    refused({"street.png": full}, r"holds street.png, not an ACDC test image \(\*_rgb_anon.png\)")
    refused({"fog/test/s/a_rgb_ref_anon.png": full}, "not an ACDC test image")  # the reference images
    refused(
        {"fog/val/s/a_rgb_anon.png": full}, r"a train / val image; the server scores the test images only"
    )
    # issue 25 (8): input= naming the val folder itself (the check only looked below input=)
    refused({"rgb_anon/fog/val/s/a_rgb_anon.png": full}, r"a train / val image", under="rgb_anon/fog/val")
    refused({"fog/test/s/a_rgb_anon.png": (960, 540)}, r"at 960×540; ACDC images are 1920×1080")
    refused({"fog/test/s/a_rgb_anon.png": full, "rain/test/s/a_rgb_anon.png": full}, "the same name twice")
    with pytest.raises(ConfigError, match="submission='kitti': use acdc"):
        run(test, tmp_path / "x", "submission=kitti")


def test_rein_with_mask2former_trains_and_eval_reproduces(compose_cfg, tmp_path):
    small = ["head=mask2former", "head.dim=32", "head.encoder_layers=1", "head.encoder_ffn=64", "head.decoder_layers=3",
             "head.decoder_ffn=64", "head.num_heads=4", "head.num_points=256", "method=rein",
             "method.rein.query_dim=32", "method.rein.num_tokens=8", "method.rein.lora_rank=4"]  # fmt: skip
    args = [a for a in backbone_args("null") if "depth" not in a and "out_indices" not in a]
    cfg = compose_cfg(
        [*DATA, *RUN, *args, *small, "+backbone.model_kwargs.depth=4", "backbone.out_indices=[0,1,2,3]"]
    )
    metrics = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = ckpt["state_dict"]
    assert any(k.startswith("head.pixel_decoder.") for k in keys) and "head.querys2feat.weight" in keys
    ecfg = compose_cfg(
        [f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "trainer=cpu"], config_name="eval"
    )
    again = evaluate(ecfg)
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/night/mIoU"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-9), k


def test_merged_checkpoint_evaluates_without_the_weights_file(compose_cfg, tmp_path, weights):
    from dgss.restore import merge

    cfg = compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=frozen"])
    metrics = train(cfg)
    merged = tmp_path / "merged.ckpt"
    info = merge(tmp_path / "checkpoints" / "last.ckpt", merged)
    assert info["backbone_weights"] == str(weights) and len(info["backbone_sha256"]) == 64
    weights.unlink()  # the merged file must not need it
    ckpt = torch.load(merged, map_location="cpu", weights_only=False)
    assert (
        any(k.startswith("backbone.model.blocks.0") for k in ckpt["state_dict"])
        and "optimizer_states" not in ckpt
    )
    again = evaluate(compose_cfg([f"ckpt_path={merged}", "trainer=cpu"], config_name="eval"))
    for k in ("val/mean_mIoU", "val/game/mIoU", "val/fog/mIoU"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-9), k


def test_eval_reads_only_the_targets_and_refuses_overrides_it_would_ignore(compose_cfg, tmp_path):
    """dgss-eval data=gta2cbm needs the Cityscapes / BDD / Mapillary validation images, not GTAV's training
    images; a model override on a dgss checkpoint (it rebuilds its own model) is refused instead of ignored; the
    toy backbone composes with real data (no dangling ${synthetic.height})."""
    from helpers.real_data import FIXTURES, write_pair

    train(compose_cfg([*DATA, *RUN, "backbone=toy", "method=full", "~callbacks.iou_tables"]))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    root = tmp_path / "data"
    for key in (("cityscapes", "val"), ("bdd100k", "val"), ("mapillary", "val")):  # no gta/ at all
        write_pair(root, *FIXTURES[key], size=(64, 32))
    ev = ["trainer=cpu", f"ckpt_path={ckpt}", "data=gta2cbm", f"paths.data_dir={root}", "data.num_workers=0"]
    out = evaluate(compose_cfg(ev, config_name="eval"))
    assert {"val/cityscapes/mIoU", "val/bdd100k/mIoU", "val/mapillary/mIoU"} <= set(out)
    with pytest.raises(ConfigError, match=r"is a dgss-train checkpoint: it rebuilds its own FullFineTune model, so "
                       r"method \(or the experiment setting them\) would be ignored; drop them"):  # fmt: skip
        evaluate(compose_cfg([*ev, "method=rein"], config_name="eval"))
    cfg = compose_cfg(["data=cs2acdc", "backbone=toy"])  # no backbone config reads a data-only key
    assert list(cfg.backbone.img_size) == [96, 192]


def test_predict_defaults_to_the_size_dgss_eval_scores(compose_cfg, tmp_path, caplog):
    """dgss-predict used native resolution while dgss-eval fits images into the target's test size: its masks were
    not the ones scored. size=auto (default) takes the checkpoint's test size; the masks equal the evaluation's
    predictions pixel for pixel."""
    import logging

    import numpy as np
    from PIL import Image

    from dgss.data.synthetic import render_sample
    from dgss.data.transforms import TestPipeline
    from dgss.predict import predict, resolve_size

    train(compose_cfg([*DATA, *RUN, "backbone=toy", "method=full", "data.test_pipeline.size=[256,128]"]))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    method, saved = load_method(str(ckpt))
    data = OmegaConf.to_container(saved.data)
    assert resolve_size("auto", data) == (
        (256, 128),
        "256×128, the test size of the checkpoint's target game",
    )
    assert resolve_size("fog", data)[0] == (256, 128) and resolve_size(None, data)[0] is None
    with pytest.raises(ConfigError, match=r"size='rain': use auto, a target of the checkpoint \(game, photo"):
        resolve_size("rain", data)
    src = tmp_path / "photos"
    src.mkdir()
    rgb = np.asarray(render_sample("photo", 0, 64, 128, 0)[0])
    Image.fromarray(rgb).save(src / "a.png")
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO, logger="dgss.predict"):
        predict(compose_cfg([f"ckpt_path={ckpt}", f"input={src}", f"output={out}", "progress=false", "device=cpu"],
                            config_name="predict"))  # fmt: skip
    assert "images fitted into 256×128, the test size of the checkpoint's target game" in caplog.text
    pipe = TestPipeline((256, 128))  # what dgss-eval feeds the model; the label stays at full resolution
    x, _ = pipe(torch.from_numpy(rgb.copy()).permute(2, 0, 1), torch.zeros(64, 128))
    method.eval()
    with torch.no_grad():
        scored = method.predict_logits(x[None], (64, 128))[0].argmax(0).numpy()
    mask = np.array(Image.open(out / "masks/a.png"))
    assert x.shape[-2:] == (128, 256) and mask.shape == (64, 128) and np.array_equal(mask, scored)


def test_predict_at_native_size_warns_before_a_slow_image(compose_cfg, tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from dgss.predict import predict

    train(compose_cfg([*DATA, *RUN, "backbone=toy", "method=full"]))
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.zeros((128, 256, 3), np.uint8)).save(src / "big.png")
    cfg = compose_cfg([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", f"input={src}", "size=null",
                       "inference={mode: slide, crop: 32, stride: 32}", f"output={tmp_path / 'p'}", "progress=false"],
                      config_name="predict")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="dgss.predict"):
        predict(cfg)
    assert "images fitted into native resolution (size=null)" in caplog.text
    assert "big.png is 256×128 at native size: 32 windows of 32 for this image" in caplog.text
    # issue 25 (8): a whole-image checkpoint on a large photo ran for minutes without the warning slide mode gives
    caplog.clear()
    cfg = compose_cfg([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", f"input={src}", "size=null",
                       "inference={mode: whole, crop: 32}", f"output={tmp_path / 'p'}", "progress=false"],
                      config_name="predict")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="dgss.predict"):
        predict(cfg)
    assert (
        "big.png is 256×128 at native size: one whole-image forward of 256×128 (32× a 32² crop)"
        in caplog.text
    )


def test_predict_refuses_outputs_that_would_overwrite_or_feed_its_inputs(compose_cfg, tmp_path):
    """Issue 25 (4, 10): street.png and street.jpg were predicted into one mask; an output folder inside the input
    folder was predicted on the next run; alpha > 1 wrapped colours, label_ids=no read as true, a missing CUDA
    device or a zero size failed deep inside. Each is one line before anything is written."""
    import numpy as np
    from PIL import Image

    from dgss.cli import check_compose, user_error
    from dgss.predict import predict

    train(compose_cfg([*DATA, *RUN, "backbone=toy", "method=full"]))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("street.png", "street.jpg"):
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(src / name)
    out = tmp_path / "pred"

    def refused(match, *more, input=src, output=out):
        cfg = compose_cfg([f"ckpt_path={ckpt}", f"input={input}", f"output={output}", "progress=false", *more],
                          config_name="predict")  # fmt: skip
        with pytest.raises(Exception) as e:  # (the method's options are checked while Hydra builds it)
            predict(cfg)
        assert re.search(match, user_error(e.value)), user_error(e.value)
        assert not Path(output).exists() or Path(output) == src

    refused(r"holds street.jpg and street.png, whose predictions would share the name masks/street.png")
    (src / "street.jpg").unlink()
    refused(r"output='.*photos/out' is inside input .*write to a folder outside it", output=src / "out")
    refused(r"output='.*photos' is input", output=src)
    (out / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(out / "masks" / "old.png")
    with pytest.raises(
        ConfigError, match=r"input \(.*pred/masks\) is inside output=.*/masks, which this command"
    ):
        predict(compose_cfg([f"ckpt_path={ckpt}", f"input={out / 'masks'}", f"output={out}", "progress=false"],
                            config_name="predict"))  # fmt: skip
    assert [p.name for p in out.rglob("*")] == ["masks", "old.png"]
    shutil.rmtree(out)
    refused(r"alpha=1.5 must be in \[0, 1\]", "alpha=1.5")
    # label_ids is a bool in dgss-predict's schema: "no" reads as false (OmegaConf's words), anything else is one line
    assert (
        compose_cfg([f"ckpt_path={ckpt}", f"input={src}", "label_ids=no"], config_name="predict").label_ids
        is False
    )
    with pytest.raises(ConfigError, match=r"^label_ids='maybe' must be bool$"):
        check_compose("predict", [f"ckpt_path={ckpt}", f"input={src}", "label_ids=maybe"])
    refused(r"size=\[0, 512\]: use \[long, short\] \(positive pixels\)", "size=[0,512]")
    refused(r"device='cuda:7': this machine has \d+ CUDA device", "device=cuda:7")
    refused(r"device='tpu': use auto, cpu, cuda", "device=tpu")
    refused(r"method.inference.stride=0 must be >= 1", "inference={mode: slide, stride: 0}")
