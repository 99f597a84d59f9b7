"""Training with masks: fine-tuning that keeps them, relevance-gated decay, iterative pruning."""

from ecp_fast._deprecation import renamed_attribute
from ecp_fast.training.finetune import finetune
from ecp_fast.training.iterative import ECPPruneStep, IterativeResult, iterative_prune
from ecp_fast.training.regularize import GammaSchedule, RelevanceDecay, RelevanceDecayOptimizer, eligible_weights

__all__ = [
    "ECPPruneStep",
    "GammaSchedule",
    "IterativeResult",
    "RelevanceDecay",
    "RelevanceDecayOptimizer",
    "eligible_weights",
    "finetune",
    "iterative_prune",
]

__getattr__ = renamed_attribute(__name__, {"ECPCriterion": ("ECPPruneStep", ECPPruneStep)})
