"""The commands' own options as Hydra root schemas: ``dgss-train``'s, ``dgss-eval``'s and ``dgss-predict``'s keys,
their types and defaults (``conf/train.yaml``, ``eval.yaml``, ``predict.yaml`` list their schema first and hold only
their groups). The sections the groups fill (``data``, ``backbone``, ``head``, ``method``, ``trainer``, ...) are typed
by the methods' options and the constructors' signatures (dgss.options, dgss.schemas); a top-level key no config
names is refused at compose time like a misspelt option."""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclasses.dataclass
class ModelSections:
    """The top-level sections the config groups of ``dgss-train`` and ``dgss-eval`` fill, each typed by its own
    schema (``data=synthetic`` adds the ``synthetic`` block, ``data=folder`` the ``folder`` one)."""

    data: Any = None
    synthetic: Any = None  # dgss.data.synthetic.SyntheticScenes
    folder: Any = None
    backbone: Any = None
    head: Any = None
    method: Any = None
    logger: Any = None
    trainer: Any = None
    paths: Any = None
    optimized_metric: str = (
        "val/mean_mIoU"  # what main() returns for sweeps (Optuna) and the best checkpoint is by
    )


@dataclasses.dataclass
class TrainCommand(ModelSections):
    """``dgss-train [experiment=<name>] [group=<choice> ...] [key=value ...]``.

    Args:
        task_name: the run's name in logs and dashboards (an experiment derives it from its config names).
        tags: the run's tags (likewise).
        seed: seeds Python, NumPy, torch and the data's draws (``data.seed`` follows it).
        ckpt_path: resume training from this Lightning checkpoint.
        overwrite: start over in a run folder that holds a run (removes its checkpoints and metrics).
        resume: ``auto``: continue from the newest loadable checkpoint in this run's folder (pin the folder with
            ``run_name``).
        compile: ``torch.compile`` each backbone block and the head's layers (regional, in place: checkpoint keys
            stay the same).
        run_name: the run folder's name (default: date_time); fixed names let ``resume=auto`` find the run again.
    """

    task_name: str = "train"
    tags: list[str] = dataclasses.field(default_factory=lambda: ["dev"])
    seed: int = 42
    ckpt_path: str | None = None
    overwrite: bool = False
    resume: str | None = None
    compile: bool = False
    run_name: str | None = None
    callbacks: Any = None


@dataclasses.dataclass
class EvalCommand(ModelSections):
    """``dgss-eval ckpt_path=<file> [data=<targets>]``: re-build the trained model from the checkpoint's own config and
    evaluate it on any data config's targets.

    Args:
        task_name: the run's name in logs.
        tags: the run's tags.
        seed: seeds the evaluation (deterministic anyway; kept for the data's draws).
        ckpt_path: the checkpoint (a file, or ``hf://user/name[@rev]`` from the local Hub cache).
        backbone_weights: where the frozen backbone's weights file moved since training.
        inference: e.g. ``{mode: slide, crop: 512, stride: 341}`` to override the trained setting.
    """

    task_name: str = "eval"
    tags: list[str] = dataclasses.field(default_factory=lambda: ["dev"])
    seed: int = 42
    ckpt_path: str = MISSING
    backbone_weights: str | None = None
    inference: Any = None


@dataclasses.dataclass
class PredictCommand:
    """``dgss-predict ckpt_path=<file> input=<folder | image | video> [output=<folder>]``: colourised masks and
    overlays (a video: ``<name>_mask.mp4`` and ``<name>_overlay.mp4`` at its frame rate).

    Args:
        ckpt_path: the checkpoint (a file, or ``hf://user/name[@rev]`` from the local Hub cache).
        input: an image file, a video file (.mp4, .mov, .avi, .mkv, .webm, ...), or a folder of images (searched
            recursively; outputs keep the sub-folders).
        output: where masks/, overlays/ (and label_ids/, acdc/ + acdc.zip) go.
        size: ``auto``: the test size of the checkpoint's first target (what dgss-eval scores); a target's name: its
            size; ``[long, short]`` (e.g. ``[1024, 512]``); null: native resolution (slow for photos).
        alpha: overlay opacity of the colourised mask, in [0, 1].
        label_ids: also Cityscapes labelId PNGs (evaluation server format; 19-class models only).
        submission: ``acdc``: also acdc/ + acdc.zip for the ACDC test server (trainId PNGs named as the images,
            1920x1080; ``input=`` the test images, acdc/rgb_anon/<condition>/test); see docs/datasets.md.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:<n>``.
        progress: show a progress bar.
        as_video: a folder of frames -> one mask video and one overlay video, frames in name order.
        fps: the frame rate of those videos (a video file keeps its own).
        batch: video frames per forward.
        backbone_weights: where the frozen backbone's weights file moved since training.
        inference: e.g. ``{mode: slide, crop: 512, stride: 341, flip: true}`` to override the trained setting.
    """

    task_name: str = "predict"
    tags: list[str] = dataclasses.field(default_factory=lambda: ["dev"])
    ckpt_path: str = MISSING
    input: str = MISSING
    output: str = "${hydra:runtime.output_dir}"
    size: Any = "auto"
    alpha: float = 0.5
    label_ids: bool = False
    submission: str | None = None
    device: str = "auto"
    progress: bool = True
    as_video: bool = False
    fps: float = 30.0
    batch: int = 4
    backbone_weights: str | None = None
    inference: Any = None
    paths: Any = None  # the group the command's config composes


ConfigStore.instance().store(name="train_schema", node=TrainCommand)
ConfigStore.instance().store(name="eval_schema", node=EvalCommand)
ConfigStore.instance().store(name="predict_schema", node=PredictCommand)
