"""Count what one dgss training step asks of a GPU, without a GPU.

The method is built on the CPU from its recipe (random init), moved to *fake* tensors (``FakeTensorMode``: shapes,
dtypes and devices, no storage, no compute) and one training step runs as Lightning's automatic optimisation runs
it: the method's own ``training_step`` (input, forward, losses, the deferred finiteness flag), the backward,
``on_before_optimizer_step`` (the non-finite guard) and the optimizer's step. A ``TorchDispatchMode`` records every
aten call with its phase (prepare, backbone, head, losses, backward, guard, optimizer), whether it launches a kernel,
its bytes and FLOPs, and every **host synchronisation** (a device-to-host copy, a blocking host-to-device copy,
``.item()`` / ``bool()`` of a device tensor, ``unique`` / ``nonzero`` / boolean indexing) with the dgss line that
asked for it. Counts depend on the model's structure, not its width: a narrow model of full depth counts as the
full one (``tests/test_step_budget.py`` keeps the budgets).

Lightning's loop and the callbacks around the step are not counted: the progress bar reads the loss every
``log_every_n_steps`` and the callbacks read host values (``tests/test_methods.py``, ``tests/test_datamodule.py``);
``make bench-gpu``'s profile stage counts a real step's ``cudaStreamSynchronize`` calls on a GPU.

The step counted is the second one (the first fills what is made once: size caches, optimizer state). Fake CUDA
tensors cannot run the autograd engine (it needs a real device), so the backward is counted on fake CPU tensors
under CPU bf16 autocast (the same graph; autocast's CPU op list differs in a few casts), every other phase on fake
CUDA tensors under CUDA bf16 autocast; attention is counted as the flash / efficient kernels an H100 takes.

    python scripts/count_step.py rein                      # DINOv2-L + Mask2Former at 512², batch 4 (1-2 min)
    python scripts/count_step.py full --narrow --json c.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
PHASES = ("prepare", "backbone", "head", "losses", "backward", "guard", "optimizer")
NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.detach.default,
    aten.lift_fresh.default, aten.set_.source_Storage_storage_offset, aten.resize_.default, aten.alias.default,
    aten._local_scalar_dense.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.is_nonzero.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten._unsafe_view.default,
}  # fmt: skip
DYNAMIC = {aten.nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.masked_select.default,
           aten.unique_consecutive.default}  # fmt: skip
# the narrow model of full depth the budget test counts: DINOv2-L's 24 blocks and Mask2Former's full depth, small widths
# (Rein's queries are the head's: their width follows it)
NARROW = ["+backbone.model_kwargs.embed_dim=64", "+backbone.model_kwargs.num_heads=2", "head.dim=32",
          "head.encoder_ffn=64", "head.decoder_ffn=64"]  # fmt: skip
NARROW_METHOD = {"rein": ["method.rein.query_dim=32"]}


@dataclasses.dataclass
class PhaseCounts:
    aten: int = 0  # aten calls, views included (each one a trip through the dispatcher)
    kernels: int = 0  # device kernel launches (a foreach / fused op: one per 100 tensors)
    copies: int = 0  # host <-> device copies
    syncs: int = 0  # host synchronisations
    gbytes: float = 0.0  # bytes read and written by kernels
    tflop: float = 0.0


def _where() -> str:
    """The innermost dgss frame that led to the current op."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        if "/dgss/" in fr.filename:
            return f"{fr.filename.split('/dgss/')[-1]}:{fr.lineno} {(fr.line or '').strip()[:90]}"
    return "?"


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class Recorder(TorchDispatchMode):
    """Every aten call on ``device`` tensors, by phase; host synchronisations with their source line."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.phase, self.recording = device, "prepare", True
        self.counts = {p: PhaseCounts() for p in PHASES}
        self.syncs: list[dict] = []
        self.ops: collections.Counter = collections.Counter()  # kernels by (phase, op)
        self.calls: collections.Counter = collections.Counter()  # aten calls by (phase, op)

    def _sync(self, kind: str) -> None:
        if self.recording:
            self.counts[self.phase].syncs += 1
            self.syncs.append({"phase": self.phase, "kind": kind, "at": _where()})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == self.device for t in tensors) or str(
            kwargs.get("device", "")
        ).startswith(self.device)
        copy = None
        if func is aten._local_scalar_dense.default and args[0].device.type == "cuda":
            self._sync(".item() / bool() of a device tensor")
        elif func in DYNAMIC and on_device and self.device == "cuda":
            self._sync(f"{func.overloadpacket.__name__} (output size)")
        elif (
            func is aten.index.Tensor
            and on_device
            and self.device == "cuda"
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        ):
            self._sync("boolean-mask indexing")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = (
                args[0].device
                if func is aten.copy_.default
                else torch.device(kwargs.get("device") or src.device)
            )
            if src.device.type == "cuda" and dst.type == "cpu":
                copy = "D2H"
                self._sync("device-to-host copy")
            elif src.device.type == "cpu" and dst.type == "cuda":
                copy = "H2D"
                if not kwargs.get("non_blocking", False):
                    self._sync("blocking host-to-device copy")
        try:
            out = func(*args, **kwargs)
        except (torch._subclasses.fake_tensor.DynamicOutputShapeException,
                torch._subclasses.fake_tensor.DataDependentOutputException):  # fmt: skip
            out = _stand_in(
                func, args
            )  # an output size only the data knows: counted, with a plausible stand-in
        if not self.recording or not (on_device or copy) or func is torch.ops.prim.device.default:
            return out
        rets = func._schema.returns
        is_view = bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        name = func.overloadpacket.__name__
        kernel = (
            not is_view and func not in NO_KERNEL and copy is None and (bool(outs) or func._schema.is_mutable)
        )
        c = self.counts[self.phase]
        c.aten += 1
        c.copies += copy is not None
        if kernel:
            lists = [len(a) for a in args if isinstance(a, (list, tuple))]
            many = name.startswith(("_foreach_", "_fused_"))
            c.kernels += max(1, -(-max(lists, default=1) // 100)) if many else 1
            c.gbytes += (sum(map(_nbytes, tensors)) + sum(map(_nbytes, outs))) / 1e9
            self.ops[(self.phase, name)] += 1
        self.calls[(self.phase, name)] += 1
        if name == "_scaled_dot_product_flash_attention_for_cpu":  # (the CPU kernels are not in the registry)
            c.tflop += sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape) / 1e12
        elif name == "_scaled_dot_product_flash_attention_for_cpu_backward":
            c.tflop += (
                sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape) / 1e12
            )
        elif func.overloadpacket in flop_registry:
            with contextlib.suppress(Exception):
                c.tflop += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) / 1e12
        return out


def _stand_in(func, args):
    """What a data-dependent op returns on fake tensors: ``.item()`` a true / one value, ``unique`` 19 values (a
    label map's classes), every element kept (``masked_select``, boolean indexing) or none (``nonzero``)."""
    x = args[0]
    if func is aten._local_scalar_dense.default:  # .item(): finite, true
        return True if x.dtype == torch.bool else (1.0 if x.dtype.is_floating_point else 1)
    if func is aten._unique2.default:  # the classes of a label map: 19
        return x.flatten()[:19], x.new_empty(0, dtype=torch.long), x.new_empty(0, dtype=torch.long)
    if func is aten.nonzero.default:
        return x.new_empty(0, x.dim(), dtype=torch.long)
    return x.flatten()


@contextlib.contextmanager
def _phase(rec: Recorder, name: str) -> Iterator[None]:
    prev, rec.phase = rec.phase, name
    try:
        yield
    finally:
        rec.phase = prev


def _host_view(self):
    """A fake tensor's host copy: presence / flags all True (every class present, every check finite), costs 0."""
    shape = tuple(self.shape)
    return np.ones(shape, dtype=bool) if self.dtype == torch.bool else np.zeros(shape, dtype=np.float32)


@contextlib.contextmanager
def _fake_world(device: str) -> Iterator[FakeTensorMode]:
    """Fake tensors whose host copies have values; attention as an H100 runs it in bf16 (flash without a mask,
    memory-efficient with one) on fake CUDA, where the CPU fallback would count the math path."""
    import torch.nn.functional as F
    import torch.nn.utils.clip_grad as cg
    import torch.utils._foreach_utils as fu

    saved = FakeTensor.numpy, F.scaled_dot_product_attention, fu._has_foreach_support, cg._has_foreach_support
    FakeTensor.numpy = _host_view
    # fake CUDA tensors count as supported by the foreach kernels, as real ones are
    fu._has_foreach_support = cg._has_foreach_support = lambda tensors, device: True
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if device != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
            return real_sdpa(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )
        if attn_mask is None:
            return aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
        return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask.to(q.dtype), False, dropout_p,
                                                            is_causal, scale=scale)[0]  # fmt: skip

    F.scaled_dot_product_attention = sdpa
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        FakeTensor.numpy, F.scaled_dot_product_attention, fu._has_foreach_support, cg._has_foreach_support = (
            saved
        )


@contextlib.contextmanager
def _autocast(device: str) -> Iterator[None]:
    """bf16 autocast on ``device``; on fake CUDA through the switches ``torch.autocast`` would refuse to set
    without a GPU."""
    if device != "cuda":
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
        return
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


def _one_step(method, batch: dict, opt, rec: Recorder, device: str, backward: bool) -> None:
    """A training step as Lightning's automatic optimisation runs it (bf16-mixed), in phases."""
    with _phase(rec, "losses"), _autocast(device):
        loss = method.training_step(batch, 0)
    if backward:
        with _phase(rec, "backward"):
            loss.backward()
    else:  # fake CUDA cannot run the autograd engine: gradients stand in (not recorded)
        rec.recording, was = False, rec.recording
        for p in method.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        rec.recording = was
    with _phase(rec, "guard"):
        method.on_before_optimizer_step(opt)
    with _phase(rec, "optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def _count_on(build, device: str) -> Recorder:
    torch.manual_seed(0)
    method = build()
    method.train()
    rec = Recorder(device)
    g = torch.Generator().manual_seed(0)
    size, n = method.count_size, method.count_batch
    labels = torch.randint(0, method.num_classes, (n, size, size), generator=g, dtype=torch.uint8)
    labels[:, : size // 8] = 255
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    with _fake_world(device):
        method = method.to(device)
        batch = {"image": images.to(device), "label": labels.to(device)}
        method.input.crop = (size, size)
        opt = method.build_optimizer()
        for group in opt.param_groups:  # torch's default on real CUDA tensors (fake ones are not "supported")
            if not group.get("fused") and group.get("foreach") is None:
                group["foreach"] = True
        # Lightning's logging needs a real trainer (and is host-side only); what the step reads of its trainer: one
        # process, bf16-mixed
        method.log = method.log_dict = lambda *a, **k: None
        method._trainer = types.SimpleNamespace(precision="bf16-mixed", world_size=1, global_step=1, global_rank=0,
                                                max_steps=100, accumulate_grad_batches=1)  # fmt: skip
        for name, part in (("prepare", None), ("backbone", method.backbone), ("head", method.head)):
            target = method if part is None else part
            attr = "prepare_batch" if part is None else "forward"
            fn = getattr(target, attr)

            def wrapped(*a, _fn=fn, _name=name, **k):
                with _phase(rec, _name):
                    return _fn(*a, **k)

            setattr(target, attr, wrapped)
        loss_fn = method.head.loss

        def loss(*a, **k):
            with _phase(rec, "losses"):
                return loss_fn(*a, **k)

        method.head.loss = loss
        with rec:
            if (
                device == "cuda"
            ):  # the first step fills what is made once (caches, optimizer state); the backward
                rec.recording = False  # (all the CPU run is kept for) is the same on any step
                _one_step(method, batch, opt, rec, device, backward=False)
                rec.recording = True
            rec.counts = {p: PhaseCounts() for p in PHASES}
            _one_step(method, batch, opt, rec, device, backward=device == "cpu")
    return rec


def count_step(build, log=None) -> dict:
    """Counts of one steady-state training step of ``build()`` (a method with ``count_size`` / ``count_batch``
    attributes set): every phase on fake CUDA, the backward on fake CPU. Returns {"phases": {phase: PhaseCounts},
    "total": PhaseCounts, "syncs": [...], "top": [...]}."""
    cuda = _count_on(build, "cuda")
    cpu = _count_on(build, "cpu")
    phases = dict(cuda.counts)
    phases["backward"] = cpu.counts["backward"]
    total = PhaseCounts()
    for c in phases.values():
        for f in dataclasses.fields(PhaseCounts):
            setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
    top = (
        cuda.ops + collections.Counter({k: v for k, v in cpu.ops.items() if k[0] == "backward"})
    ).most_common(25)
    return {"phases": phases, "total": total, "syncs": cuda.syncs, "top": top}


def recipe_method(
    name: str, size: int = 512, batch: int = 4, narrow: bool = False, extra: list[str] | None = None
):
    """A builder of ``experiment=gta2cbm/<name>_dinov2_l`` (random init), counted at ``size``² and ``batch``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import compose

    from dgss.config import build_method

    overrides = [f"experiment=gta2cbm/{name}_dinov2_l", "backbone.weights=null", "trainer.max_steps=100",
                 f"backbone.img_size={size}", *(NARROW + NARROW_METHOD.get(name, []) if narrow else []),
                 *(extra or [])]  # fmt: skip
    cfg = compose(overrides)

    def build():
        method = build_method(cfg)
        method.count_size, method.count_batch = size, batch
        return method

    return build


def render(counts: dict) -> str:
    lines = [
        f"{'phase':10s} {'aten':>6s} {'kernels':>7s} {'copies':>6s} {'syncs':>5s} {'GB':>8s} {'TFLOP':>7s}"
    ]
    for name, c in [*counts["phases"].items(), ("TOTAL", counts["total"])]:
        lines.append(
            f"{name:10s} {c.aten:6d} {c.kernels:7d} {c.copies:6d} {c.syncs:5d} {c.gbytes:8.2f} {c.tflop:7.3f}"
        )
    lines.append("\nhost synchronisations per step, by source:")
    for (ph, kind, at), n in collections.Counter(
        (s["phase"], s["kind"], s["at"]) for s in counts["syncs"]
    ).items():
        lines.append(f"  {n:3d}  [{ph}] {kind}  <- {at}")
    lines.append("\nops launching the most kernels:")
    lines += [f"  {n:5d} {ph:10s} {op}" for (ph, op), n in counts["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", help="a recipe of experiment=gta2cbm/<method>_dinov2_l: full, rein, soma, ...")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--narrow", action="store_true", help="small widths, full depth (what the budget test counts)"
    )
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("overrides", nargs="*", help="more config overrides")
    a = ap.parse_args(argv)
    counts = count_step(recipe_method(a.method, a.size, a.batch, a.narrow, a.overrides))
    print(render(counts))
    if a.json:
        out = {"phases": {k: dataclasses.asdict(v) for k, v in counts["phases"].items()},
               "total": dataclasses.asdict(counts["total"]), "syncs": counts["syncs"]}  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
