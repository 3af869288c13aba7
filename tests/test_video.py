"""dgss-predict on a video file and on a folder of frames: mask and overlay videos at the source's frame rate, one
frame out per frame in, each the prediction the image path makes for that frame; a damaged or unknown file is one
line."""

import av
import numpy as np
import pytest
import torch
from helpers.runs import DATA, RUN, backbone_args
from PIL import Image

from dgss.data.classes import ClassSet
from dgss.data.synthetic import render_sample
from dgss.errors import ConfigError
from dgss.predict import predict
from dgss.restore import load_method
from dgss.train import train


def write_clip(path, frames, fps):
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def read_clip(path):
    """(frames as RGB arrays, the stream's average rate)."""
    with av.open(str(path)) as c:
        rate = c.streams.video[0].average_rate
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)], rate


@pytest.fixture
def ckpt(compose_cfg, tmp_path, weights):  # noqa: F811
    train(compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=full"]))
    return tmp_path / "checkpoints" / "last.ckpt"


def test_a_video_gives_mask_and_overlay_videos_frame_for_frame(compose_cfg, tmp_path, ckpt):
    frames = [np.asarray(render_sample("photo", i, 50, 90, 0)[0]) for i in range(12)]
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames, 10)
    out = tmp_path / "pred"
    res = predict(compose_cfg([f"ckpt_path={ckpt}", f"input={clip}", f"output={out}", "progress=false",
                               "device=cpu", "batch=5", "size=null"], config_name="predict"))  # fmt: skip
    assert res["frames"] == 12 and res["fps"] == 10
    masks, rate = read_clip(out / "clip_mask.mp4")
    overlays, orate = read_clip(out / "clip_overlay.mp4")
    assert len(masks) == len(overlays) == 12 and rate == orate == 10
    assert masks[0].shape == overlays[0].shape == (50, 90, 3)
    # each mask frame is the image path's prediction for the frame as decoded (H.264 at CRF 18: close, not equal)
    method, saved = load_method(str(ckpt))
    method.eval()
    classes = ClassSet.build(saved.data.get("num_classes"))
    decoded, _ = read_clip(clip)
    preds = []
    for f in decoded:
        with torch.no_grad():
            preds.append(
                method.predict_logits(torch.from_numpy(f).permute(2, 0, 1)[None], (50, 90))[0].argmax(0)
            )
    palette = torch.tensor(classes.palette, dtype=torch.float32)
    for i, m in enumerate(masks):  # the class of each decoded pixel: the nearest palette colour
        got = torch.cdist(torch.from_numpy(m).float().view(-1, 3), palette).argmin(1).view(50, 90)
        agree = [float((got == p).float().mean()) for p in preds]
        assert agree[i] > 0.85 and agree[i] == max(agree), (i, agree[i], max(agree))


def test_a_folder_of_frames_becomes_one_video_in_name_order(compose_cfg, tmp_path, ckpt):
    """Odd frame sides (51×91) are extended to even ones for yuv420p; the rate is fps=."""
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.asarray(render_sample("fog", i, 51, 91, 0)[0])).save(src / f"f{i:03d}.png")
    out = tmp_path / "pred"
    res = predict(compose_cfg([f"ckpt_path={ckpt}", f"input={src}", f"output={out}", "as_video=true", "fps=5",
                               "progress=false", "device=cpu"], config_name="predict"))  # fmt: skip
    assert res["frames"] == 5
    masks, rate = read_clip(out / "frames_mask.mp4")
    assert len(masks) == 5 and rate == 5 and masks[0].shape == (52, 92, 3)
    assert not (out / "masks").exists()  # no per-image outputs


def test_a_damaged_or_unknown_video_is_one_line(compose_cfg, tmp_path, ckpt):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match="is not a video FFmpeg can read"):
        predict(
            compose_cfg(
                [f"ckpt_path={ckpt}", f"input={bad}", f"output={tmp_path / 'o'}"], config_name="predict"
            )
        )
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ConfigError, match="is not an image file, a video or a folder of images"):
        predict(
            compose_cfg(
                [f"ckpt_path={ckpt}", f"input={txt}", f"output={tmp_path / 'o'}"], config_name="predict"
            )
        )
    clip = tmp_path / "clip.mp4"
    write_clip(clip, [np.zeros((32, 32, 3), np.uint8)] * 2, 5)
    with pytest.raises(ConfigError, match="label_ids= and submission= write one file per image"):
        predict(compose_cfg([f"ckpt_path={ckpt}", f"input={clip}", "label_ids=true"], config_name="predict"))
