"""Training with masks: fine-tuning that keeps them, relevance-gated decay, iterative pruning."""

from ecp_fast.training.finetune import finetune
from ecp_fast.training.iterative import ECPCriterion, IterativeResult, iterative_prune
from ecp_fast.training.regularize import GammaSchedule, RelevanceDecay, RelevanceDecayOptimizer, eligible_weights

__all__ = [
    "ECPCriterion", "GammaSchedule", "IterativeResult", "RelevanceDecay", "RelevanceDecayOptimizer",
    "eligible_weights", "finetune", "iterative_prune",
]
