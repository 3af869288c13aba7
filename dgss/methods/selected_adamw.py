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


class SelectedAdamW(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer``: Lightning saves and restores its state like any optimizer's, and a scheduler
    drives its ``lr``. One parameter group (``name: backbone_selected``) over the candidate tensors.

    Args:
        params: name → full tensor (a parameter) whose selected elements this optimizer owns.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay acts on selected elements only).
        prior_l2: strength of a pull towards each element's value at selection (MAP form of a Gaussian prior).

    State per tensor (only once something is selected): ``index`` (flat indices), ``exp_avg``, ``exp_avg_sq``,
    ``steps`` (per element: an element selected later starts its bias correction afresh) and ``theta0``.
    """

    FIELDS = ("index", "exp_avg", "exp_avg_sq", "steps", "theta0")

    def __init__(self, params: dict[str, torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, prior_l2: float = 0.0):  # fmt: skip
        self.names = dict(params)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), prior_l2=float(prior_l2))  # fmt: skip
        super().__init__([{"params": list(self.names.values()), "name": "backbone_selected"}], defaults)

    def _state(self, name: str) -> dict:
        return self.state[self.names[name]]

    def num_selected(self) -> int:
        return sum(int(s["index"].numel()) for s in self.state.values() if "index" in s)

    def index(self, name: str) -> torch.Tensor:
        s = self._state(name)
        return s["index"] if "index" in s else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def add(self, name: str, index: torch.Tensor) -> None:
        """Select more elements of ``params[name]`` (flat indices, not yet selected): zero moments, step 0."""
        if index.numel() == 0:
            return
        p = self.names[name]
        index = index.to(device=p.device, dtype=torch.long)
        zeros = lambda: torch.zeros(index.numel(), device=p.device, dtype=torch.float32)  # noqa: E731
        new = {"index": index, "exp_avg": zeros(), "exp_avg_sq": zeros(), "steps": zeros(),
               "theta0": p.detach().reshape(-1)[index].clone()}  # fmt: skip
        s = self.state[p]
        self.state[p] = new if "index" not in s else {k: torch.cat([s[k], new[k]]) for k in self.FIELDS}

    @torch.no_grad()
    def retain(self, name: str, keep: torch.Tensor) -> None:
        """Deselect the elements where ``keep`` (aligned with :meth:`index`) is False: their value goes back to
        what it was at selection, and their state is dropped."""
        p = self.names[name]
        s = self.state[p]
        if "index" not in s or bool(keep.all()):
            return
        drop = ~keep
        p.data.view(-1)[s["index"][drop]] = s["theta0"][drop]
        self.state[p] = {k: v[keep] for k, v in s.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            wd, prior = group["weight_decay"], group["prior_l2"]
            for p in group["params"]:
                s = self.state[p]
                if p.grad is None or "index" not in s:
                    continue
                flat = p.data.view(-1)
                idx = s["index"]
                x = flat[idx].float()
                g = p.grad.view(-1)[idx].float()
                if prior:
                    g = g + prior * (x - s["theta0"].float())
                s["steps"] += 1
                s["exp_avg"].lerp_(g, 1 - b1)
                s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - b1 ** s["steps"]
                bc2 = 1 - b2 ** s["steps"]
                if wd:
                    x.mul_(1 - lr * wd)
                denom = (s["exp_avg_sq"] / bc2).sqrt_().add_(eps)
                x.sub_(lr * (s["exp_avg"] / bc1) / denom)
                flat[idx] = x.to(flat.dtype)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every non-``step`` state tensor to the parameter's dtype; the flat indices must stay
        int64 (a float32 index is wrong beyond 2²⁴), so they are set aside and restored as they were saved."""
        state = {pid: dict(s) for pid, s in state_dict["state"].items()}
        index = {pid: s.pop("index") for pid, s in state.items() if "index" in s}
        super().load_state_dict({**state_dict, "state": state})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in index:
                self.state[p]["index"] = index[pid].to(device=p.device, dtype=torch.long)
