"""Video in and out for ``dgss-predict``: a video file (or a folder of frames, in name order) segmented frame by frame,
written as a colourised mask video and an overlay video at the source's frame rate.

Decoding and encoding go through PyAV (FFmpeg's libraries, in its wheels): H.264 (libx264, ``yuv420p``, CRF 18) in an
MP4 container, which every player opens. ``yuv420p`` needs even frame sides: an odd side is extended by repeating its
last row / column (the prediction itself is made on the frame as it is). Frames are predicted ``batch`` at a time, at
the checkpoint's test size (``size=auto``) and resized back to the frame's size, as single images are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dgss.compat import optional_module
from dgss.data.classes import ClassSet
from dgss.data.transforms import TestPipeline
from dgss.errors import ConfigError
from dgss.io import atomic_path

log = logging.getLogger("dgss.predict")
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"}


@dataclass
class VideoSource:
    """Frames (H, W, 3) uint8 RGB of a video file or a frame folder, with their rate and (if known) count."""

    name: str  # what the outputs are named after
    rate: Fraction  # frames per second
    frames: int | None  # None: the container does not say
    path: Path
    images: list[Path] | None = None  # a frame folder's frames, in order

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.images is not None:
            for p in self.images:
                yield read_rgb(p)
            return
        av = pyav()
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise ConfigError(
                f"input={str(self.path)!r}: decoding stopped ({e}); the file is damaged"
            ) from None


def pyav():
    """PyAV, or one line saying how to install it (the ``video`` extra)."""
    return optional_module("av", "videos need PyAV (FFmpeg's libraries): pip install 'dgss[video]'")


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - a user's file: one line
        raise ConfigError(
            f"cannot read {path} ({e}); remove it from input= or convert it to PNG / JPEG"
        ) from None


def open_video(path: Path) -> VideoSource:
    """A video file's first video stream (rate, frame count), or one line saying why it cannot be read."""
    av = pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ConfigError(f"input={str(path)!r} holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise ConfigError(f"input={str(path)!r}: the video does not state its frame rate")
            return VideoSource(path.stem, Fraction(rate), int(stream.frames) or None, path)
    except av.FFmpegError as e:
        raise ConfigError(f"input={str(path)!r} is not a video FFmpeg can read ({e.strerror or e})") from None


def frame_folder(folder: Path, images: list[Path], fps: float) -> VideoSource:
    """A folder of frames as one video, in name order, at ``fps``."""
    if not fps > 0:
        raise ConfigError(f"fps={fps}: a frame rate is > 0")
    return VideoSource(folder.name, Fraction(fps).limit_denominator(1001), len(images), folder, images)


@contextlib.contextmanager
def video_writer(
    dst: Path, rate: Fraction, width: int, height: int
) -> Iterator[Callable[[np.ndarray], None]]:
    """An H.264 MP4 written frame by frame (the yielded function takes (H, W, 3) uint8 RGB), atomically: the file
    appears when the block ends without an error."""
    av = pyav()
    with atomic_path(dst) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=rate, options={"crf": "18"})
            stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"

            def write(rgb: np.ndarray) -> None:
                h, w = rgb.shape[:2]
                if h % 2 or w % 2:  # yuv420p: even sides, the last row / column repeated
                    rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)

            yield write
            for packet in stream.encode():  # what the encoder still holds
                container.mux(packet)
        finally:
            container.close()


@torch.no_grad()
def predict_video(method, source: VideoSource, out: Path, classes: ClassSet, size, alpha: float, batch: int,
                  device: torch.device, progress: bool) -> dict:  # fmt: skip
    """Segment every frame of ``source``; write ``<name>_mask.mp4`` (the colourised prediction) and
    ``<name>_overlay.mp4`` (the frame blended with it, ``alpha``) under ``out``. Returns the counts and paths."""
    pipeline = TestPipeline(size)
    paths = {"masks": out / f"{source.name}_mask.mp4", "overlays": out / f"{source.name}_overlay.mp4"}
    bar = tqdm(total=source.frames, desc="dgss-predict", unit="frame", disable=not progress)
    count, pending, first = 0, [], None
    with contextlib.ExitStack() as files, bar:
        writers: dict[str, Callable[[np.ndarray], None]] = {}

        def flush() -> None:
            x = torch.stack([pipeline(torch.from_numpy(f).permute(2, 0, 1), torch.zeros(f.shape[:2]))[0]
                             for f in pending])  # fmt: skip
            preds = method.predict_logits(x.to(device), pending[0].shape[:2]).argmax(1).cpu().numpy()
            for rgb, pred in zip(pending, preds):
                colour = classes.colorize(pred)
                writers["masks"](colour)
                writers["overlays"](
                    ((1 - alpha) * rgb + alpha * colour.astype(np.float32)).round().astype(np.uint8)
                )
            bar.update(len(pending))
            pending.clear()

        for rgb in source:
            if first is None:
                first = rgb.shape
                writers = {k: files.enter_context(video_writer(p, source.rate, first[1], first[0]))
                           for k, p in paths.items()}  # fmt: skip
            elif rgb.shape != first:
                raise ConfigError(f"input={str(source.path)!r}: frame {count} is {rgb.shape[1]}×{rgb.shape[0]}, the "
                                  f"first {first[1]}×{first[0]}; a video's frames have one size")  # fmt: skip
            pending.append(rgb)
            count += 1
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        if not count:
            raise ConfigError(f"input={str(source.path)!r} holds no frames")
    log.info(f"{count} frames at {float(source.rate):g} fps: {paths['masks']}, {paths['overlays']}")
    return {"frames": count, "fps": float(source.rate), **{k: str(p) for k, p in paths.items()}}
