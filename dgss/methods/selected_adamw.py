"""AdamW over chosen elements of full tensors, with optimizer state for those elements only.

Selective fine-tuning (FisherTune, ChildTune-like methods) updates a few percent of a backbone's elements. A
plain ``torch.optim.AdamW`` over the backbone would keep two moments for every element and apply its decoupled
weight decay to every element, selected or not. This keeps, per tensor, the flat indices of the selected
elements and for each of them the two moments, its own step count (an element selected later starts its bias
correction afresh, like a new parameter) and its value when it was selected (for the optional prior pull and for
restoring deselected elements). Elements outside the index are never written.

The update is AdamW's (Loshchilov & Hutter): ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
``θ ← θ (1 − lr·wd) − lr · m̂ / (√v̂ + eps)``, with ``g`` optionally plus ``prior_l2 · (θ − θ_selected)``.
"""

from __future__ import annotations

import torch


class SelectedAdamW:
    """Args:
    params: name → full tensor (a parameter) whose selected elements this optimizer owns.
    betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay acts on selected elements only).
    prior_l2: strength of a pull towards each element's value at selection (MAP form of a Gaussian prior).
    """

    FIELDS = ("index", "exp_avg", "exp_avg_sq", "step", "theta0")

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        prior_l2: float = 0.0,
    ):
        self.params = params
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.prior_l2 = float(prior_l2)
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def num_selected(self) -> int:
        return sum(int(s["index"].numel()) for s in self.state.values())

    def index(self, name: str) -> torch.Tensor:
        s = self.state.get(name)
        return s["index"] if s is not None else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def add(self, name: str, index: torch.Tensor) -> None:
        """Select more elements of ``params[name]`` (flat indices, not yet selected): zero moments, step 0."""
        if index.numel() == 0:
            return
        p = self.params[name]
        index = index.to(device=p.device, dtype=torch.long)
        new = {
            "index": index,
            "exp_avg": torch.zeros(index.numel(), device=p.device, dtype=torch.float32),
            "exp_avg_sq": torch.zeros(index.numel(), device=p.device, dtype=torch.float32),
            "step": torch.zeros(index.numel(), device=p.device, dtype=torch.float32),
            "theta0": p.detach().reshape(-1)[index].clone(),
        }
        old = self.state.get(name)
        self.state[name] = new if old is None else {k: torch.cat([old[k], new[k]]) for k in self.FIELDS}

    @torch.no_grad()
    def retain(self, name: str, keep: torch.Tensor) -> None:
        """Deselect the elements where ``keep`` (aligned with :meth:`index`) is False: their value goes back to
        what it was at selection, and their state is dropped."""
        s = self.state.get(name)
        if s is None or bool(keep.all()):
            return
        drop = ~keep
        self.params[name].data.view(-1)[s["index"][drop]] = s["theta0"][drop]
        self.state[name] = {k: v[keep] for k, v in s.items()}

    @torch.no_grad()
    def step(self, lr: float) -> None:
        b1, b2 = self.betas
        for name, s in self.state.items():
            p = self.params[name]
            if p.grad is None:
                continue
            flat = p.data.view(-1)
            idx = s["index"]
            x = flat[idx].float()
            g = p.grad.view(-1)[idx].float()
            if self.prior_l2:
                g = g + self.prior_l2 * (x - s["theta0"].float())
            s["step"] += 1
            s["exp_avg"].lerp_(g, 1 - b1)
            s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1 = 1 - b1 ** s["step"]
            bc2 = 1 - b2 ** s["step"]
            if self.weight_decay:
                x.mul_(1 - lr * self.weight_decay)
            denom = (s["exp_avg_sq"] / bc2).sqrt_().add_(self.eps)
            x.sub_(lr * (s["exp_avg"] / bc1) / denom)
            flat[idx] = x.to(flat.dtype)

    def state_dict(self) -> dict:
        return {name: {k: v.clone() for k, v in s.items()} for name, s in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.params)
        if unknown:
            raise KeyError(f"optimizer state for unknown tensors: {sorted(unknown)[:5]}")
        self.state = {
            name: {k: s[k].to(self.params[name].device) for k in self.FIELDS} for name, s in state.items()
        }
