"""The contract between data sets and the loaders, and the one wrapper that turns a data set into samples.

A data set (:class:`SegmentationData`: ``RealDataset``, ``SyntheticDomain``, your own) only reads: ``load(i)`` gives
the checked uint8 image and trainId label of item ``i``. :class:`Samples` owns everything a loader adds, once for
every data set: the sampler's item (a :class:`~dgss.data.resumable.Draw` carrying the augmentation seed, a
rare-class preference), the transform (train or test pipeline) run under that seed, and bad files (``on_bad``:
error, or skip — a training sample is replaced by the next readable one, an evaluation sample is left out; either
way counted in ``skipped``).
"""

from __future__ import annotations

import torch

from dgss.data.protocols import PairedData, SegmentationData
from dgss.data.rare_class import split_index
from dgss.data.resumable import Draw, seeded
from dgss.errors import ConfigError


class Samples(torch.utils.data.Dataset):
    """The samples of ``data`` as a loader hands them out: ``{"image", "label", "name", "skipped"}``.

    Args:
        data: a :class:`SegmentationData`.
        transform: ``transform(image, label, prefer)`` (a train or test pipeline).
        substitute: what an unreadable item becomes with ``on_bad: skip``: the next readable item (training), or
            a sample with ``image`` None that the evaluation collate leaves out (never another image twice).
    """

    def __init__(self, data: SegmentationData, transform, substitute: bool = True):
        if not isinstance(data, SegmentationData):
            raise ConfigError(
                f"{type(data).__name__} is not a dgss data set: it needs __len__, load(i), name(i), on_bad"
            )
        self.data, self.transform, self.substitute = data, transform, substitute
        # a data set with paired domains also renders each scene there, through the same draws (FisherTune's oracle)
        self.paired = isinstance(data, PairedData) and bool(data.paired_domains)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item) -> dict:
        item, seed = (item.item, item.seed) if isinstance(item, Draw) else (item, None)
        i, prefer = split_index(item)
        n = len(self.data)
        for k in range(n):
            j = (i + k) % n
            try:
                image, label = self.data.load(j)
                break
            except ConfigError:
                if self.data.on_bad == "error":
                    raise
                if not self.substitute:  # evaluation: left out (collate_eval drops it), never another image
                    return {"image": None, "label": None, "name": self.data.name(j), "skipped": 1}
        else:
            raise ConfigError(f"{self.data.name(i)}: no readable item in the whole data set (on_bad: skip)")
        paired = self.paired
        with seeded(seed):
            state = torch.get_rng_state() if paired else None
            image, out_label = self.transform(image, label, prefer)
            if (
                paired
            ):  # the same scene in another domain through the same draws: geometry and photometric alike
                after = torch.get_rng_state()
                torch.set_rng_state(state)
                paired_image, _ = self.transform(self.data.load_paired(j), label, prefer)
                torch.set_rng_state(after)
        sample = {"image": image, "label": out_label, "name": self.data.name(j), "skipped": k}
        if paired:
            sample["paired_image"] = paired_image
        return sample
