"""FisherTune (CVPR'25, https://arxiv.org/abs/2503.17940; no official code): selective fine-tuning of the backbone
elements the domain-related Fisher information ranks highest. The package: options (:mod:`.options`), schedule
(:mod:`.schedule`), Fisher statistics (:mod:`.statistics`), scores (:mod:`.score`), selection (:mod:`.selection`),
one training step (:mod:`.step`), reporting (:mod:`.report`) and the method's wiring (:mod:`.method`)."""

from dgss.methods.fishertune.method import FisherTune
from dgss.methods.fishertune.options import (
    GROUPS,
    FinalizeOptions,
    FisherOptions,
    FisherTuneConfig,
    FisherTuneOptions,
    OptimOptions,
    PerturbOptions,
    ScheduleOptions,
    SelectionOptions,
)
from dgss.methods.fishertune.report import FisherTuneReport
from dgss.methods.fishertune.schedule import Schedule, growth_ratio
from dgss.methods.fishertune.score import SCORES, DrFimScore, FimScore, RandomScore, dr_fim, random_score_seed
from dgss.methods.fishertune.selection import (
    KINDS,
    apportion,
    block_of,
    breakdown,
    grow_selection,
    kind_counts,
    scope_groups,
    selection_digest,
    top_k_first,
)
from dgss.methods.fishertune.statistics import FisherStatistics, accumulate_squares, batch_slice, fisher_scale
from dgss.methods.fishertune.step import FisherStep

__all__ = ["GROUPS", "KINDS", "SCORES", "DrFimScore", "FimScore", "FinalizeOptions", "FisherOptions", "FisherStatistics",
           "FisherStep", "FisherTune", "FisherTuneConfig", "FisherTuneOptions", "FisherTuneReport", "OptimOptions",
           "PerturbOptions", "RandomScore", "Schedule", "ScheduleOptions", "SelectionOptions", "accumulate_squares",
           "apportion", "batch_slice", "block_of", "breakdown", "dr_fim", "fisher_scale", "grow_selection",
           "growth_ratio", "kind_counts", "random_score_seed", "scope_groups", "selection_digest", "top_k_first"]  # fmt: skip
