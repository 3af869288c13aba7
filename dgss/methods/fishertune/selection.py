"""FisherTune's selection: the elements with the highest scores join it (ties to the lower index, so every rank
picks the same), per scope group in proportion to its size, ``granularity`` units at a time; and how a selection is
reported (per block and module kind) and compared across ranks (an exact digest). Pure functions."""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist

KINDS = ("q", "k", "v", "proj", "fc1", "fc2", "norm", "other")


def top_k_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest finite scores; ties broken by the lower index (identical on all ranks)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    k = min(k, int(torch.isfinite(scores).sum()))
    if k <= 0:
        return out
    thr = torch.topk(scores, k, sorted=False).values.min()
    out = scores > thr
    need = k - int(out.sum())
    out[(scores == thr).nonzero().squeeze(1)[:need]] = True
    return out


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder; sums to ``total``)."""
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    out = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


@torch.no_grad()
def grow_selection(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], groups: list[list[str]], k: int,
                   granularity: str = "element", monotone: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The elements (flat indices per tensor) that bring the selection to ``k``: per scope group a budget in
    proportion to its size (:func:`apportion`), filled with the highest scores, ``granularity`` units (element, row,
    tensor) at a time. ``monotone``: already selected elements (``masks``) stay and count towards the budget, only
    new ones are returned; otherwise the fresh top-k. Consumes ``scores`` (edited in place and released tensor by
    tensor, to keep the peak memory low). Ties go to the lower index, so every rank picks the same."""
    targets = apportion(k, [sum(masks[n].numel() for n in g) for g in groups])
    chosen: dict[str, torch.Tensor] = {}
    for names, target in zip(groups, targets):
        have = sum(int(masks[n].sum()) for n in names) if monotone else 0
        units, shapes = [], []
        for n in names:
            sc = scores.pop(n).float()
            if monotone:
                sc.masked_fill_(masks[n], -math.inf)
            if granularity == "element" or (granularity == "row" and sc.ndim < 2):
                u, size = sc.reshape(-1), 1
            elif granularity == "row":
                u, size = sc.reshape(sc.shape[0], -1).mean(1), sc[0].numel()
            else:
                u, size = sc.reshape(1, -1).mean(1), sc.numel()
            units.append(u)
            shapes.append((n, u.numel(), size))
        u = torch.cat(units)
        del units
        need = max(target - have, 0)
        if all(size == 1 for _, _, size in shapes):
            pick = top_k_first(u, need)
        else:  # coarse units: best first (stable order) while the budget lasts
            sz = torch.cat([torch.full((count,), size, dtype=torch.long) for _, count, size in shapes])
            order = torch.sort(u, descending=True, stable=True).indices
            order = order[torch.isfinite(u[order])]
            order = order[torch.cumsum(sz.to(order.device)[order], 0) <= need]
            pick = torch.zeros_like(u, dtype=torch.bool)
            pick[order] = True
        del u
        offset = 0
        for n, count, size in shapes:
            sel = pick[offset : offset + count]
            offset += count
            if size > 1:
                sel = sel.repeat_interleave(size) if count > 1 else sel.expand(size)
            chosen[n] = sel.reshape(-1).nonzero().squeeze(1)
    return chosen


def scope_groups(names: list[str], scope: str) -> list[list[str]]:
    """The candidate tensors grouped for one budget each: all together (``global``), per block, per tensor.

    >>> scope_groups(["blocks.0.a", "blocks.0.b", "blocks.1.a", "norm"], "per_block")
    [['blocks.0.a', 'blocks.0.b'], ['blocks.1.a'], ['norm']]
    """
    if scope == "global":
        return [list(names)]
    if scope == "per_tensor":
        return [[n] for n in names]
    blocks: dict[int, list[str]] = {}
    for n in names:
        blocks.setdefault(block_of(n), []).append(n)
    return list(blocks.values())


def selection_digest(indices: list[torch.Tensor]) -> torch.Tensor:
    """An exact int64 fingerprint of a selection (flat indices per tensor, in a fixed tensor order): the count,
    Σ_t (t + 1)·Σ idx and Σ idx² mod (2³¹ − 1). Ranks compare it to prove they selected the same elements."""
    out = torch.zeros(3, dtype=torch.int64)
    for t, idx in enumerate(indices):
        i = idx.detach().to(torch.int64).cpu()
        out[0] += i.numel()
        out[1] += (t + 1) * int(i.sum())
        out[2] = (out[2] + int(((i * i) % 2147483647).sum())) % 2147483647
    return out


def check_ranks_agree(indices: list[torch.Tensor], world_size: int, device: torch.device) -> None:
    """Every rank selected the same elements: an exact int64 digest (:func:`selection_digest`), min = max."""
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    digest = selection_digest(indices).to(device)
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("FisherTune: the selection differs across ranks (gradients were not synchronised)")


def block_of(name: str) -> int:
    """Block index in a parameter name (``blocks.7.…``), -1 outside the blocks."""
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def kind_counts(name: str, mask: torch.Tensor) -> dict[str, int]:
    """Selected elements of one tensor per module kind; a fused qkv splits into thirds along its output rows."""
    if ".qkv." in name:
        parts = mask.reshape(3, -1).sum(1).tolist()
        return dict(zip(("q", "k", "v"), (int(x) for x in parts)))
    leaf = name.split(".")[-2:]
    joined = ".".join(leaf)
    for kind, pats in (
        ("q", ("q_proj", "q_bias")),
        ("k", ("k_proj", "k_bias")),
        ("v", ("v_proj", "v_bias")),
        ("fc1", ("fc1", "lin1", "w1", "w12")),
        ("fc2", ("fc2", "lin2", "w3")),
        ("norm", ("norm",)),
    ):
        if any(p in joined for p in pats):
            return {kind: int(mask.sum())}
    if ".attn.proj." in name:
        return {"proj": int(mask.sum())}
    return {"other": int(mask.sum())}


def breakdown(masks: dict[str, torch.Tensor]) -> list[dict]:
    """Selected elements per block and module kind: rows of block, kind, selected, share of the selection."""
    counts: dict[tuple[int, str], int] = {}
    for name, mask in masks.items():
        for kind, c in kind_counts(name, mask).items():
            key = (block_of(name), kind)
            counts[key] = counts.get(key, 0) + c
    total = max(sum(counts.values()), 1)
    return [
        {"block": b, "kind": k, "selected": c, "share": c / total} for (b, k), c in sorted(counts.items())
    ]
