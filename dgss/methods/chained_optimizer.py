"""Several optimizers that Lightning's automatic optimisation steps as one.

Lightning's automatic optimisation takes one optimizer per training step. A method whose parameters need two update
rules (FisherTune: the head's AdamW, and :class:`~dgss.methods.selected_adamw.SelectedAdamW` for a few selected
elements of the backbone) hands Lightning a :class:`ChainedOptimizer` over both. It is a real
``torch.optim.Optimizer``: its ``param_groups`` are the members' group dicts themselves (a scheduler, gradient
clipping and ``zero_grad`` act on every member), its ``state`` reads and writes each parameter's entry in the member
that owns it, and ``state_dict`` / ``load_state_dict`` save and restore every member's state (each member loads its
own part with its own ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch


class _RoutedState(MutableMapping):
    """The chain's ``state``: each parameter's entry lives in the member optimizer that owns the parameter."""

    def __init__(self, chain: ChainedOptimizer):
        self.chain = chain

    def __getitem__(self, p: torch.Tensor) -> dict:
        return self.chain.owner(p).state[p]

    def __setitem__(self, p: torch.Tensor, value: dict) -> None:
        self.chain.owner(p).state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self.chain.owner(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for o in self.chain.optimizers:
            yield from list(o.state)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self.chain.optimizers)


class ChainedOptimizer(torch.optim.Optimizer):
    """``optimizers`` stepped in order as one optimizer; no parameter may belong to two of them.

    ``defaults`` are the first member's (its ``lr`` is the base lr a schedule and the logs refer to). ``step(closure)``
    evaluates the closure once (Lightning's: forward, backward, the ``on_before_optimizer_step`` hooks, clipping),
    then steps every member without one.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        if not optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        self._owner = {p: o for o in self.optimizers for g in o.param_groups for p in g["params"]}
        # the members' group dicts themselves; no defaults filled in (each member keeps its own keys)
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self.defaults = self.optimizers[0].defaults
        self.state = _RoutedState(self)  # type: ignore[assignment]

    def owner(self, p: torch.Tensor) -> torch.optim.Optimizer:
        return self._owner[p]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Each member loads its own groups and their parameters' state (with its own loader: e.g. SelectedAdamW
        keeps its int64 indices); the chain's ``param_groups`` then point at the members' new group dicts."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the saved optimizer has {len(groups)} parameter groups, this one {len(self.param_groups)}"
            )
        start = 0
        for o in self.optimizers:
            mine = groups[start : start + len(o.param_groups)]
            start += len(o.param_groups)
            ids = {i for g in mine for i in g["params"]}
            o.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in ids},
                               "param_groups": mine})  # fmt: skip
        self.param_groups[:] = [g for o in self.optimizers for g in o.param_groups]  # the same list object
