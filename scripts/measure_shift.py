"""How large is a real domain shift of feature statistics, in the units FisherTune's perturbation draws in?

FisherTune's simulated shift (``method.fishertune.perturb``, :class:`dgss.models.style_perturb.ChannelStatPerturbation`) moves
each sample's per-channel token mean μ by ``z · s · Σ_μ`` (z ~ N(0, 1), Σ_μ the batch std of μ) and its std σ
likewise. The embedded data renders the *same scenes* in the source domain (game) and in every target domain, so the
real shift of those statistics is measurable scene by scene at the blocks the perturbation acts after:
``Δμ = μ_target − μ_source``. The scale at which the perturbation's mean shift ``E|z| · s · Σ = 0.798 · s · Σ`` equals
the real one is

    s_μ = mean |Δμ| / (0.798 · mean Σ_μ)          (and s_σ the same with σ)

averaged over samples, channels and blocks, per target domain. ``perturb.scale`` / ``scale_sigma`` at these values
make the simulated shift as large as the real one (issue 27's review measured the default s = 1 at 3-8 × smaller).

    python scripts/measure_shift.py --weights weights/toy_mim.safetensors          # the demo's backbone
    python scripts/measure_shift.py --weights none --batches 4                     # random init (smoke)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import torch

from dgss.models.style_perturb import channel_stats, shift_in_draw_units

E_ABS_Z = math.sqrt(2 / math.pi)  # E|z| of a standard normal: 0.798


def matching_scale(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> float:
    """s with 0.798 · s · (mean batch std of the source statistic) = mean |target − source| (paired samples).

    >>> src = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]])  # batch std 1 in each channel
    >>> round(matching_scale(src, src + 2 * E_ABS_Z), 3)  # every sample moved by twice the draw's mean |z|
    2.0
    """
    return float(shift_in_draw_units(source, target, eps)) / E_ABS_Z


@torch.no_grad()
def measure(backbone, blocks: Sequence[int], source: str, targets: Sequence[str], batches: int, batch_size: int,
            height: int, width: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per target domain: the matching scales s_μ and s_σ, averaged over ``blocks`` (the perturbation's)."""
    from dgss.data.synthetic import SyntheticDomain

    seen: dict[int, torch.Tensor] = {}

    def hook(x, i):
        if i in blocks:
            seen[i] = x.detach().clone()
        return x

    handle = backbone.register_block_hook(hook)
    mean = torch.tensor(backbone.normalization[0]).view(3, 1, 1)
    std = torch.tensor(backbone.normalization[1]).view(3, 1, 1)
    stats: dict[str, dict[int, list]] = {d: {b: [] for b in blocks} for d in (source, *targets)}
    try:
        for d in stats:
            data = SyntheticDomain(d, "train", batches * batch_size, height, width)
            for k in range(batches):
                x = torch.stack([data.load(k * batch_size + j)[0] for j in range(batch_size)]).float() / 255
                seen.clear()
                backbone((x - mean) / std)
                for b in blocks:
                    stats[d][b].append(channel_stats(seen[b], backbone.num_prefix_tokens))
    finally:
        handle.remove()
    out = {}
    for t in targets:
        s_mu, s_sigma = [], []
        for b in blocks:
            for (mu_s, sig_s), (mu_t, sig_t) in zip(stats[source][b], stats[t][b]):
                s_mu.append(matching_scale(mu_s, mu_t))
                s_sigma.append(matching_scale(sig_s, sig_t))
        out[t] = {"scale": sum(s_mu) / len(s_mu), "scale_sigma": sum(s_sigma) / len(s_sigma)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--weights", default="weights/toy_mim.safetensors", help="the demo backbone's weights; none: random"
    )
    ap.add_argument(
        "--blocks", type=int, nargs="+", default=[0, 1, 2], help="method.fishertune.perturb.after_blocks"
    )
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=192)
    a = ap.parse_args(argv)
    from dgss.data.synthetic import SOURCE_DOMAINS, TARGET_DOMAINS
    from dgss.models.backbone import Backbone

    torch.manual_seed(0)
    weights = None if a.weights in ("none", "null", "") else a.weights
    bb = Backbone("vit_small_patch14_reg4_dinov2", weights=weights, img_size=(a.height, a.width),
                  model_kwargs=dict(depth=4, embed_dim=96, num_heads=3, patch_size=8)).eval()  # fmt: skip
    res = measure(bb, a.blocks, SOURCE_DOMAINS[0], TARGET_DOMAINS, a.batches, a.batch_size, a.height, a.width)
    for t, r in res.items():
        print(f"{t:9s} perturb.scale {r['scale']:.2f}   perturb.scale_sigma {r['scale_sigma']:.2f}")
    mean = {k: sum(r[k] for r in res.values()) / len(res) for k in ("scale", "scale_sigma")}
    print(f"mean over the targets: method.fishertune.perturb.scale={mean['scale']:.2f} method.fishertune.perturb.scale_sigma="
          f"{mean['scale_sigma']:.2f}")  # fmt: skip
    print(json.dumps({"targets": res, "mean": mean}))
    return {"targets": res, "mean": mean}


if __name__ == "__main__":
    main()
