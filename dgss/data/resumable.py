"""A training stream that a restarted run continues exactly: same order, same augmentation, same position.

``SeededSampler`` wraps the sampler that draws one pass's order (uniform, per-source weighted or rare-class) and
hands out every drawn item with a seed made from the pass and the item's position in it; the training data set
augments the item under that seed (``seeded``). A sample is then augmented identically whatever the number
of loader workers or ranks, and after a restart, where fresh workers would otherwise start their random streams
anew. ``SkipSampler`` is the outermost sampler (after the split over ranks): a resumed run skips the batches the
checkpointed run had already trained on, without loading them. The DataModule keeps the state in checkpoints:
the generator's state when the interrupted pass began and the number of batches trained in it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

_SEED_SPAN = 2**62


class Draw(NamedTuple):
    """One drawn training item and the seed its augmentation runs under."""

    item: Any
    seed: int


class SeededSampler(Sampler):
    """Yields ``Draw(item, seed)`` for each item of ``sampler``.

    ``generator`` advances by exactly two draws a pass: the seed of ``pass_generator`` (the one ``sampler`` draws the
    pass's order from) and the first augmentation seed. A pass's randomness therefore does not depend on how far the
    previous pass was iterated (Lightning stops at the known length; an exhausted ``RandomSampler`` draws once more).
    """

    def __init__(self, sampler: Sampler, generator: torch.Generator, pass_generator: torch.Generator):
        self.sampler, self.generator, self.pass_generator = sampler, generator, pass_generator
        self.pass_state: torch.Tensor = generator.get_state()

    def __len__(self) -> int:
        return len(self.sampler)

    def next_pass(self) -> int:
        """Seeds the pass's order; returns its first augmentation seed."""
        self.pass_state = self.generator.get_state()  # where this pass began: what a checkpoint stores
        order, augment = torch.randint(_SEED_SPAN, (2,), generator=self.generator).tolist()
        self.pass_generator.manual_seed(order)
        return augment

    def __iter__(self) -> Iterator[Draw]:
        base = self.next_pass()
        for position, item in enumerate(self.sampler):
            yield Draw(item, base + position)


class SkipSampler(Sampler):
    """The per-rank stream; after ``load_state_dict`` its next pass starts ``batches`` batches in."""

    def __init__(self, sampler: Sampler, seeded: SeededSampler, batch_size: int):
        self.sampler, self.seeded, self.batch_size = sampler, seeded, batch_size
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip * self.batch_size, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def state_dict(self, batches_done: int) -> dict[str, Any]:
        return {"pass_state": self.seeded.pass_state.clone(), "batches": int(batches_done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seeded.generator.set_state(state["pass_state"])
        batches = int(state["batches"])
        if batches >= len(self) // self.batch_size:  # the pass was complete: the next one starts afresh
            self.seeded.next_pass()
            batches = 0
        self.skip = batches


@contextmanager
def seeded(seed: int | None):
    """Seed torch's CPU generator for one sample's augmentation; the caller's stream is restored afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
