"""Pretrain the demo's toy ViT self-supervised on unlabelled images of every embedded domain.

Broad pretraining in miniature: a foundation model sees many kinds of images without labels before anyone tunes
it for segmentation. Here the toy DINOv2-style ViT of ``backbone=toy`` learns masked-image modelling (SimMIM:
block-masked patch tokens are replaced by a learned mask token, a linear decoder predicts the masked patches'
per-patch-normalised pixels) on a pool of images rendered from all five domains' ``unlabelled`` split, a scene
range that no training or validation split uses. No label is read.

The result is saved as a timm state dict in safetensors, the format ``backbone.weights`` loads (through timm's
checkpoint filter, like any released checkpoint), with a JSON record of the run next to it.

    python scripts/pretrain_toy.py --out weights/toy_mim.safetensors          # ~2-3 min on 2 CPU cores
    dgss-train experiment=demo backbone.weights=weights/toy_mim.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import v2

import dgss.config  # noqa: F401  (resolvers)
from dgss.data.synthetic import DOMAINS, SPLIT_OFFSETS, render_sample
from dgss.io import atomic_path


def render_pool(per_domain: int, height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (N, 3, H, W): ``per_domain`` scenes of the unlabelled split in every domain (different scenes)."""
    images = []
    for d, domain in enumerate(DOMAINS):
        for i in range(per_domain):
            img, _ = render_sample(
                domain, SPLIT_OFFSETS["unlabelled"] + d * per_domain + i, height, width, seed
            )
            images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(images)


class SimMIM(nn.Module):
    """Mask token + linear pixel decoder around a timm ViT (the model whose state dict gets saved)."""

    def __init__(self, vit: nn.Module, patch: int):
        super().__init__()
        self.vit, self.patch = vit, patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(vit.embed_dim, patch * patch * 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = self.vit
        t = m.patch_embed(x)  # (B, gh, gw, C): dynamic image size keeps the grid
        t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        t = m.norm_pre(m.patch_drop(m._pos_embed(t)))
        for blk in m.blocks:
            t = blk(t)
        t = m.norm(t)[:, m.num_prefix_tokens :]
        pred = self.decoder(t)  # (B, N, p*p*3)
        target = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, 3*p*p)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1e-6).sqrt()  # per-patch normalised pixels (MAE's norm_pix_loss)
        err = (pred - target).pow(2).mean(-1)
        w = mask.flatten(1).float()
        return (err * w).sum() / w.sum().clamp_min(1)


def block_mask(b: int, gh: int, gw: int, ratio: float, block: int, gen: torch.Generator) -> torch.Tensor:
    """(B, gh, gw) bool: ``ratio`` of ``block`` x ``block`` patch cells masked (SimMIM's block masking)."""
    ch, cw = math.ceil(gh / block), math.ceil(gw / block)
    n = ch * cw
    k = round(ratio * n)
    order = torch.rand(b, n, generator=gen).argsort(1)
    cells = torch.zeros(b, n, dtype=torch.bool)
    cells.scatter_(1, order[:, :k], True)
    cells = cells.view(b, ch, cw).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return cells[:, :gh, :gw]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="weights/toy_mim.safetensors")
    ap.add_argument("--backbone", nargs="*", default=["backbone=toy"], help="Hydra overrides of the backbone")
    ap.add_argument("--height", type=int, default=96, help="rendered image size (the demo's)")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument(
        "--crop", type=int, nargs=2, default=[64, 128], help="training crop: fewer tokens per step"
    )
    ap.add_argument("--per-domain", type=int, default=300, help="unlabelled scenes rendered per domain")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument(
        "--mask-block", type=int, default=2, help="masking cell in patches (2 = 16 px at patch 8)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*args.backbone, f"synthetic.height={args.height}",
                                          f"synthetic.width={args.width}", "backbone.final_norm=true"])  # fmt: skip
    from hydra.utils import instantiate

    bb = instantiate(cfg.backbone)
    vit, patch = bb.model, bb.patch_size
    model = SimMIM(vit, patch)
    pool = render_pool(args.per_domain, args.height, args.width, args.seed)
    t_render = time.time() - t0
    print(f"rendered {len(pool)} unlabelled images of {len(DOMAINS)} domains in {t_render:.0f} s; model "
          f"{bb.name} ({sum(p.numel() for p in vit.parameters()):,} parameters), patch {patch}")  # fmt: skip
    aug = v2.Compose([
        v2.RandomResizedCrop(tuple(args.crop), scale=(0.25, 1.0), ratio=(1.5, 2.5), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(*bb.normalization),  # the backbone's own input normalisation
    ])  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    gh, gw = args.crop[0] // patch, args.crop[1] // patch
    losses = []
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(pool), (args.batch,), generator=gen)
        x = torch.stack([aug(pool[i]) for i in idx])
        mask = block_mask(args.batch, gh, gw, args.mask_ratio, args.mask_block, gen)
        loss = model(x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.time() - t0:.0f} s", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # never a half-written file under the final name
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp))
    record = {
        "backbone_overrides": args.backbone, "objective": "SimMIM (block-masked patch pixel regression)",
        "images": len(pool), "domains": list(DOMAINS), "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "mask_ratio": args.mask_ratio, "seed": args.seed, "loss_first_50": sum(losses[:50]) / 50,
        "loss_last_50": sum(losses[-50:]) / 50, "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"saved {out} ({record['seconds']} s; loss {record['loss_first_50']:.3f} -> {record['loss_last_50']:.3f})"
    )


if __name__ == "__main__":
    main()
