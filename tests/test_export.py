"""dgss-export: the inference graph as ONNX (run by onnxruntime) and as a torch.export program equals
``predict_logits`` (whole image, no TTA) for every method and backbone family; adapters that fold are folded."""

import copy
import json
import logging

import onnx
import pytest
import torch

from dgss.config import build_method
from dgss.export import ExportOptions, InferenceGraph, default_input_size, export_method, run_exported

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
logging.getLogger("onnx_ir").setLevel(logging.WARNING)
logging.getLogger("onnxscript").setLevel(logging.WARNING)

FOLDS = {"full": True, "frozen": True, "fishertune": True, "lora": True, "soma": True, "recyclelora": True,
         "rein": False, "vpt": False, "adaptformer": False, "cobot_lora": False}  # fmt: skip


def tiny_method(compose_cfg, method, backbone="toy", head="light"):
    """A tiny random-init method whose trained parameters are moved off their identity start (adapters that
    begin at zero would fold to nothing and prove nothing)."""
    cfg = compose_cfg(["debug=tiny", f"method={method}", f"backbone={backbone}", f"head={head}"])
    torch.manual_seed(0)
    m = build_method(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def scores(m, images):
    with torch.no_grad():
        return m.predict_logits(images, images.shape[-2:])


# one method that folds and one that keeps its modules in the default suite, every other one in the slow one
DEFAULT = {"lora", "rein"}


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in FOLDS]
)
def test_every_method_exports_to_onnx_equal_to_predict_logits(compose_cfg, tmp_path, method):
    """Two batch sizes through the one graph (the batch axis is dynamic); the reference is the method's own
    predict_logits before folding."""
    m = tiny_method(compose_cfg, method)
    images = torch.randint(
        0, 256, (3, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    want = scores(m, images)
    result = export_method(m, tmp_path, ExportOptions(), [64, 128])
    assert result["folded"] == FOLDS[method]
    got = run_exported(tmp_path / "model.onnx", "onnx", images)
    assert got.shape == want.shape == (3, 19, 64, 128)
    assert float((got - want).abs().max()) <= 1e-4
    graph = onnx.load(tmp_path / "model.onnx")
    assert graph.opset_import[0].version >= 16
    names = " ".join(i.name for i in graph.graph.initializer)
    if FOLDS[method]:  # the folded graph holds no adapter weights
        assert not any(k in names for k in ("lora", "adapter", ".A0", ".B0"))


@pytest.mark.parametrize(
    "backbone",
    ["samvit_b", *(pytest.param(b, marks=pytest.mark.slow) for b in ("eva02_l", "clip_l", "dinov3_s"))],
)
def test_every_backbone_family_exports(compose_cfg, tmp_path, backbone):
    """EVA02 (RoPE), SAM (windowed attention with relative positions: no fused form in ONNX, written out), CLIP and
    DINOv3 (RoPE, registers), each through LoRA folded into it."""
    m = tiny_method(compose_cfg, "lora", backbone)
    images = torch.randint(
        0, 256, (2, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    want = scores(m, images)
    export_method(m, tmp_path, ExportOptions(), [64, 128])
    assert float((run_exported(tmp_path / "model.onnx", "onnx", images) - want).abs().max()) <= 1e-4


def test_mask2former_exports_with_its_deformable_attention_as_grid_sample(compose_cfg, tmp_path):
    """Rein's tokens linked to Mask2Former's queries; the pixel decoder's deformable attention becomes GridSample.
    Its scores sum over the queries (here up to ~20), where PyTorch's own float32 is ~1e-4 from float64: the file
    is within 1e-4 of the scores' scale, and no farther from float64 than PyTorch's float32 is."""
    m = tiny_method(compose_cfg, "rein", head="mask2former")
    images = torch.randint(
        0, 256, (2, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    want = scores(m, images)
    exact = scores(copy.deepcopy(m).double(), images)
    export_method(m, tmp_path, ExportOptions(), [64, 128])
    got = run_exported(tmp_path / "model.onnx", "onnx", images)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert float((got - exact).abs().max()) <= 2 * float((want - exact).abs().max())
    ops = {n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node}
    assert "GridSample" in ops


def test_a_dynamic_size_graph_pads_any_size_itself(compose_cfg, tmp_path):
    """dynamic_size: height and width are free, including sizes that are not patch multiples (the graph pads them;
    a padding decided by a Python branch at tracing time would give wrong scores there). Also as a .pt2 program."""
    m = tiny_method(compose_cfg, "full")
    images = torch.randint(
        0, 256, (1, 3, 69, 123), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    want = scores(m, images)
    for fmt in ("onnx", "pt2"):
        out = tmp_path / fmt
        out.mkdir()
        res = export_method(m, out, ExportOptions(format=fmt, dynamic_size=True), [64, 128])
        assert res["max_abs_difference"] <= 1e-4  # the export's own check: another batch and size
        got = run_exported(out / f"model.{fmt}", fmt, images)
        assert float((got - want).abs().max()) <= 1e-4


def test_a_fixed_size_graph_is_fixed():
    """Without dynamic_size the file states its size; the default size is the checkpoint's test size, landscape."""
    assert default_input_size({"targets": {"cityscapes": {"test_size": [1024, 512]}}}) == [512, 1024]
    assert default_input_size({"targets": {}, "train_pipeline": {"crop": [512, 512]}}) == [512, 512]


def test_the_graph_is_predict_logits_in_pytorch_too(compose_cfg):
    m = tiny_method(compose_cfg, "rein")
    images = torch.randint(0, 256, (2, 3, 61, 130), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(InferenceGraph(m).eval()(images), scores(m, images))


def test_dgss_export_writes_the_file_and_its_card_from_a_checkpoint(tmp_path, capsys):
    """The command on a trained checkpoint (dgss-train's own output): model.onnx, model.json with the classes, the
    checkpoint's sha256 and the measured difference; a bad option is one line."""
    import hashlib
    import sys

    from dgss.export import main as export_main
    from dgss.train import main as train_main

    run = tmp_path / "run"
    argv = sys.argv
    try:
        sys.argv = ["dgss-train", "experiment=demo", "debug=tiny", "method=lora", "backbone.weights=null", "~logger",
                    f"hydra.run.dir={run}"]  # fmt: skip
        train_main()
        ckpt = run / "checkpoints" / "last.ckpt"
        sys.argv = ["dgss-export", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'export'}"]
        export_main()
        card = json.loads((tmp_path / "export" / "model.json").read_text())
        assert card["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert card["folded"] and card["input_size"] == [64, 128] and card["max_abs_difference"] <= 1e-4
        assert len(card["class_names"]) == len(card["palette"]) == 19
        sys.argv = ["dgss-export", f"ckpt_path={ckpt}", "format=tflite", f"hydra.run.dir={tmp_path / 'bad'}"]
        with pytest.raises(SystemExit) as e:
            export_main()
        assert e.value.code != 0
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dgss-export: error:") and "format" in err[-1] and "onnx" in err[-1]
