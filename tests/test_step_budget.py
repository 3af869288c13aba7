"""Issue 26 (7): what one training step asks of a GPU, counted on the CPU with fake tensors (``scripts/count_step.py``),
held to budgets kept in one place (:data:`BUDGETS`), so that a change that brings back a host synchronisation or
hundreds of small kernels fails CI without a GPU. The model is DINOv2-L's 24 blocks and Mask2Former's full depth at
small widths, batch 4 at 512²: the counts depend on the structure, not the width."""

import pytest
import torch
from helpers.scripts import load_script

# One steady-state training step (bf16-mixed), per method and phase: (aten calls, kernel launches) as counted after
# issue 26; a phase may grow by MARGIN before the test fails. The whole step: at most SYNCS host synchronisations (the
# classes present, the cost matrices, the finiteness of loss and gradients), the losses at most LOSSES_ATEN aten calls
# (the per-layer criterion before it: ~3,000 calls, 31 synchronisations).
SYNCS = 3
LOSSES_ATEN = 300
MARGIN = 0.05
BUDGETS = {
    "full": {"prepare": (8, 6), "backbone": (981, 534), "head": (2459, 1137), "losses": (263, 168),
             "backward": (6077, 2672), "guard": (9, 14), "optimizer": (6, 14)},
    "rein": {"prepare": (8, 6), "backbone": (1582, 752), "head": (2465, 1142), "losses": (286, 180),
             "backward": (6377, 3077), "guard": (9, 11), "optimizer": (4, 8)},
}  # fmt: skip


@pytest.fixture(scope="module")
def count_step():
    return load_script("count_step")


@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_one_training_step_stays_within_its_budget(count_step, method):
    counts = count_step.count_step(count_step.recipe_method(method, narrow=True))
    table = count_step.render(counts)
    assert counts["total"].syncs <= SYNCS, table
    assert counts["phases"]["losses"].aten <= LOSSES_ATEN, table
    for phase, (aten, kernels) in BUDGETS[method].items():
        got = counts["phases"][phase]
        assert got.aten <= aten * (1 + MARGIN), f"{phase}: {got.aten} aten calls, budget {aten}\n{table}"
        assert got.kernels <= kernels * (1 + MARGIN), (
            f"{phase}: {got.kernels} kernels, budget {kernels}\n{table}"
        )


def test_the_counter_sees_each_kind_of_host_synchronisation(count_step):
    """The instrument can fail: on fake CUDA tensors it counts ``.item()``, a device-to-host copy, a blocking
    host-to-device copy, ``torch.unique`` and boolean indexing as synchronisations, and a non-blocking copy and plain
    kernels as none; views are aten calls without a kernel."""
    rec = count_step.Recorder("cuda")
    with count_step._fake_world("cuda"), rec:
        x = torch.ones(8, device="cuda")
        rec.phase = "losses"
        y = (x * 2).view(2, 4)  # a kernel and a view
        assert rec.counts["losses"].syncs == 0 and rec.counts["losses"].kernels == 1
        assert rec.counts["losses"].aten == 2
        torch.ones(3).to("cuda", non_blocking=True)
        assert rec.counts["losses"].syncs == 0
        rec.phase = "guard"
        y.sum().item()
        y.cpu()
        torch.ones(3).to("cuda")
        torch.unique(x)
        x[x > 0]
    kinds = [s["kind"] for s in rec.syncs]
    assert rec.counts["guard"].syncs == 5 and len(kinds) == 5, kinds
    assert any("item" in k for k in kinds) and any("device-to-host" in k for k in kinds)
    assert any("blocking host-to-device" in k for k in kinds) and any("unique" in k for k in kinds)
    assert any("boolean" in k for k in kinds)


def _tiny_step(method, compiled_backend=None):
    """One bf16 forward + losses + backward of a tiny method on a fixed batch: (loss, gradients, graphs captured)."""
    graphs = []

    def backend(gm, example_inputs):  # the captured graph, run as captured (eager numerics)
        graphs.append(gm)
        return gm.forward

    if compiled_backend:
        torch._dynamo.reset()
        method.compile_regions(backend=backend)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 19, (2, 64, 64), generator=g, dtype=torch.uint8)}  # fmt: skip
    method.input.crop = (64, 64)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images, labels = method.prepare_batch(batch)
        loss = sum(method.head.loss(method(images), labels).values())
    params = [p for p in method.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params), graphs


@pytest.mark.parametrize("method", ["full", "rein", "lora", "soma"])
def test_regional_compilation_captures_one_block_graph_whatever_the_depth_without_graph_breaks(
    compose_cfg, method
):
    """Issue 26 (6): ``compile=true`` compiles each backbone block and each of Mask2Former's encoder and decoder
    layers (``compile_regions``); dynamo captures them without a graph break, and the number of graphs does not grow
    with the depth (4 or 8 blocks: no recompilation per block). The captured graphs compute what eager does, bit for
    bit; the losses stay eager."""
    from torch._dynamo.utils import counters

    from dgss.config import build_method

    counts = {}
    for depth in (4, 8):
        cfg = compose_cfg([f"method={method}", "head=mask2former", "debug=tiny",
                           f"++backbone.model_kwargs.depth={depth}"])  # fmt: skip
        torch.manual_seed(0)
        eager = build_method(cfg).train()
        want_loss, want_grads, _ = _tiny_step(eager)
        torch.manual_seed(0)
        compiled = build_method(cfg).train()
        assert len(compiled.backbone.model.blocks) == depth
        counters.clear()
        loss, grads, graphs = _tiny_step(compiled, compiled_backend=True)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert torch.equal(loss, want_loss) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
        counts[depth] = len(graphs)
    torch._dynamo.reset()
    # per kind of block (1; +1 where the first block's input needs no gradient, behind a frozen embedding; +1 for
    # SoMA's unwrapped blocks), the encoder layer (1) and the decoder layer (2: its memory's size changes with the
    # level, so the second size makes one dynamic-shape graph)
    assert counts[4] == counts[8] == {"full": 4, "rein": 5, "lora": 5, "soma": 6}[method], counts


def test_the_optimizer_takes_its_fused_path_on_cuda_and_foreach_elsewhere(compose_cfg):
    """Issue 26 (5), the plumbing on the CPU: AdamW gets ``fused=True`` for CUDA parameters and ``foreach=True``
    for CPU ones, unless the config chose; an optimizer without either option gets neither (the docstring's examples
    run here too)."""
    import doctest
    import functools

    import dgss.methods.recipe as base
    from dgss.config import build_method

    assert doctest.testmod(base, verbose=False).failed == 0
    method = build_method(compose_cfg(["method=rein", "debug=tiny"]))
    opt = method.build_optimizer()
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)
    chosen = functools.partial(torch.optim.AdamW, lr=1e-4, foreach=False)
    assert base.fast_implementation(chosen, {"cuda"}) == {}
    assert base.fast_implementation(functools.partial(torch.optim.SGD, lr=0.1), {"cuda"}) == {"fused": True}
    plain = functools.partial(lambda params, lr: torch.optim.Adagrad(params, lr=lr), lr=0.1)
    assert base.fast_implementation(plain, {"cuda"}) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused kernels exist there only")
def test_fused_adamw_matches_foreach_for_twenty_steps_on_cuda():
    """Issue 26 (5) on a GPU: 20 AdamW steps of the fused implementation land within 1e-6 of the foreach one."""
    torch.manual_seed(0)
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in (1000, 64, 7)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=True)
    foreach = torch.optim.AdamW(twins, lr=1e-3, weight_decay=0.05, foreach=True)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        foreach.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
