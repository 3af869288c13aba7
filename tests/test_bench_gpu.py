"""``scripts/bench_gpu.py`` (``make bench-gpu``) never rots: its CPU smoke run covers every stage of the GPU run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the methods the smoke run measures: the ones every other stage uses (fp32 / compile: full and Rein; slide: Rein;
# profile: frozen and full) and FisherTune's refresh period; every method's row: the slow test below
SMOKE_METHODS = ("full", "frozen", "rein", "fishertune")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``--device cpu --tiny`` run of every stage, shared by the tests below."""
    bench = load("bench_gpu")
    out = tmp_path_factory.mktemp("bench_gpu")
    rc = bench.main([str(out), "--device", "cpu", "--tiny", "--methods", ",".join(SMOKE_METHODS), "--work-dir",
                     str(out / "work")])  # fmt: skip
    return rc, out, json.loads((out / "bench_gpu.json").read_text())


@pytest.mark.slow
def test_every_method_has_its_row(tmp_path):
    """The methods stage for every method bench_gpu knows (the default suite's smoke run measures four)."""
    bench = load("bench_gpu")
    rc = bench.main([str(tmp_path), "--device", "cpu", "--tiny", "--stages", "methods", "--work-dir",
                     str(tmp_path / "work")])  # fmt: skip
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert rc == 0 and {r["method"] for r in rows if r["ok"] and r["step_ms"] > 0} == set(bench.METHODS)


def test_every_stage_measured(smoke):
    rc, out, data = smoke
    assert rc == 0, [r for r in data["rows"] if not r["ok"]]
    rows = data["rows"]
    by = {(r["stage"], r["method"], r.get("precision")): r for r in rows}
    for m in SMOKE_METHODS:
        r = by[("methods", m, "bf16-mixed")]
        assert r["ok"] and r["step_ms"] > 0 and r["images_s"] == pytest.approx(2 / (r["step_ms"] / 1000))
        assert r["flops"] > 0 and r["trainable"] > 0
    for m in ("full", "rein"):
        assert by[("fp32", m, "32-true")]["ok"]
        compiled = by[("compile", m, "bf16-mixed")]
        assert compiled["ok"] and compiled["compile"]
        # the same computation whatever the precision; a compiled row reports its eager row's FLOPs
        assert (
            by[("fp32", m, "32-true")]["flops"]
            == by[("methods", m, "bf16-mixed")]["flops"]
            == compiled["flops"]
        )
    # frozen trains only the head: fewer trainable parameters than full, more than nothing
    assert (
        by[("methods", "frozen", "bf16-mixed")]["trainable"]
        < by[("methods", "full", "bf16-mixed")]["trainable"]
    )
    ft = by[("methods", "fishertune", "bf16-mixed")]
    assert ft["stat_steps"] == 1 and ft["timed_steps"] == 3  # one refresh period R = 3 with a window of 1
    assert ft["refresh_ms"] > 0 and "refresh period" in ft["note"]
    slide = by[("slide", "rein", "bf16 autocast")]
    assert slide["ok"] and slide["windows_per_image"] == 3  # 128 wide, 64 windows at stride 43: x = 0, 43, 64
    cli = next(r for r in rows if r["stage"] == "cli")
    assert cli["ok"] and cli["train_exit"] == 0 and cli["eval_exit"] == 0 and cli["steps"] == 4
    assert cli["loss_finite"] and cli["eval_matches_train"]  # dgss-eval reloads the checkpoint: same mIoU
    assert all(r["commit"] and r["torch"] and r["device"] for r in rows)
    for m in ("frozen", "full"):  # the profile stage: host time per part of the step, the report file
        prof = by[("profile", m, "bf16-mixed")]
        assert prof["ok"] and prof["profiled_steps"] == 2 and set(prof["host_ms"]) == {"backbone", "head", "losses",
                                                                                         "backward"}  # fmt: skip
        assert all(v > 0 for v in prof["host_ms"].values())
        # the whole-step criterion finds the classes present without torch.unique; on the CPU no kernel, no idle
        assert prof["device_kernel_ms"] == 0 and prof["unique_per_step"] == 0 and prof["device_idle_ms"] == 0
        assert prof["kernel_ms"] == {"attention": 0, "gemm": 0, "optimizer": 0, "elementwise": 0}
        assert prof["host_syncs_per_step"] == 0  # (no CUDA stream to wait for on the CPU)
        assert "## by self host time" in (out / f"profile_{m}.txt").read_text()


def test_report_files(smoke):
    _, out, data = smoke
    md = (out / "bench_gpu.md").read_text()
    for m in SMOKE_METHODS:
        assert f"| {m} | bf16-mixed |" in md
    assert "**CLI end to end**" in md and "**Slide inference**" in md
    assert {t["target"] for t in data["targets"]} >= {"Rein MFU, bf16, compile on", "Rein peak memory / full"}
    versions = {v["package"]: v for v in data["environment"]["versions"]}
    assert versions["timm"]["bound"] and versions["timm"]["within"] is True
    assert (out / "cli_train.log").read_text().startswith("$ ") and (out / "cli_eval.log").is_file()


def test_a_failing_method_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    bench = load("bench_gpu")
    real = bench.train_row

    def flaky(name, *args, **kw):
        if name == "frozen":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(name, *args, **kw)

    monkeypatch.setattr(bench, "train_row", flaky)
    rc = bench.main(
        [str(tmp_path), "--device", "cpu", "--tiny", "--stages", "methods", "--methods", "frozen,rein"]
    )
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    assert rc == 1
    assert [(r["method"], r["ok"]) for r in rows] == [("frozen", False), ("rein", True)]
    assert rows[0]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "illegal memory access" in (tmp_path / "bench_gpu.md").read_text()


def test_peak_table_and_targets():
    md = load("benchmarks_md")
    assert (
        md.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0 and md.peak_bf16_tflops("NVIDIA H200") == 989.0
    )
    assert md.peak_bf16_tflops("Quadro P1000") is None
    bench = load("bench_gpu")
    report = bench.Report.__new__(bench.Report)
    report.rows = [
        {"stage": "methods", "method": "full", "precision": "bf16-mixed", "ok": True, "peak_mib": 1000.0,
         "mean_step_ms": 100.0, "step_ms": 100.0},
        {"stage": "methods", "method": "rein", "precision": "bf16-mixed", "ok": True, "peak_mib": 500.0},
        {"stage": "methods", "method": "fishertune", "precision": "bf16-mixed", "ok": True, "mean_step_ms": 160.0},
        {"stage": "fp32", "method": "full", "precision": "32-true", "ok": True, "step_ms": 250.0},
        {"stage": "compile", "method": "rein", "precision": "bf16-mixed", "ok": True, "mfu": 0.3},
    ]  # fmt: skip
    got = {t["target"]: (t["value"], t["met"]) for t in report.targets()}
    assert got == {
        "Rein MFU, bf16, compile on": (0.3, False),
        "Rein peak memory / full": (0.5, True),
        "FisherTune mean step over a refresh period / full mean step": (1.6, False),
        "full: bf16 step / fp32 step": (0.4, True),
    }


def test_gpu_env_install_is_a_no_op_in_a_dev_install(capsys):
    env = load("gpu_env")
    assert env.dgss_from_this_tree()
    assert env.install() == 0
    assert "nothing installed" in capsys.readouterr().out


def test_the_profile_splits_kernel_time_by_kind_and_measures_the_idle_gaps():
    """Issue 26 (9), on made-up device events (a GPU's profile is not available here): kernel time per kind, and the
    idle time between kernels as the span less the union of the kernels' intervals (overlaps counted once)."""
    from types import SimpleNamespace

    bench = load("bench_gpu")

    def kernel(name, start, end):
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name="CUDA"), is_user_annotation=False,
                               time_range=SimpleNamespace(start=start, end=end))  # fmt: skip

    host = SimpleNamespace(name="aten::mm", device_type=SimpleNamespace(name="CPU"), is_user_annotation=False,
                           time_range=SimpleNamespace(start=0, end=10_000))  # fmt: skip
    events = [host, kernel("sm90_xmma_gemm_bf16", 0, 4000), kernel("flash_fwd_kernel", 3000, 5000),
              kernel("vectorized_elementwise_kernel", 7000, 8000),
              kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 9000, 10_000)]  # fmt: skip
    split, idle = bench.kernel_timeline(events, steps=2)
    assert split == {"attention": 1.0, "gemm": 2.0, "optimizer": 0.5, "elementwise": 0.5}  # ms per step
    # span 0..10 ms, busy 0..5 + 7..8 + 9..10 = 7 ms: 3 ms idle in 2 steps
    assert idle == 1.5
    assert (
        bench.kernel_kind("ampere_bf16_s16816gemm") == "gemm"
        and bench.kernel_kind("reduce_kernel") == "elementwise"
    )
