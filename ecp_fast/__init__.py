"""ecp_fast: elimination-compensation pruning (ECP) for PyTorch.

Fused ops (``torch.ops.ecp.moments``, ``ecp.score``, ``ecp.finalize``) compute, for every weight of
a layer at once, the importance that already accounts for the best shift of its neuron's bias;
see :mod:`ecp_fast.ops` for the contract and :mod:`ecp_fast.ops.reference` for the plain-PyTorch
oracle. The pruner (:mod:`ecp_fast.pruning`), training with masks (:mod:`ecp_fast.training`),
distributed calibration (:mod:`ecp_fast.distributed`) and export formats (:mod:`ecp_fast.export`)
build on them; the command line and experiments live in :mod:`ecp_fast.apps`.
"""

from ecp_fast.export import export as export_model
from ecp_fast.export import export_semi_structured, load_compact, save_compact
from ecp_fast.ops import finalize, gram, moments, score
from ecp_fast.ops.merge import Moments, merge_moments
from ecp_fast.pruning import (
    Importance,
    LayerReport,
    Pruner,
    PruneReport,
    ScoringContext,
    SequentialReport,
    StructuredReport,
    apply_masks_from_state_dict,
    get_masks,
    prune,
    prune_neurons,
    prune_sequential,
    register_importance,
    remove_masks,
)
from ecp_fast.training import IterativeResult, RelevanceDecay, RelevanceDecayOptimizer, finetune, iterative_prune

__version__ = "0.2.0"

__all__ = [
    "Importance",
    "IterativeResult",
    "LayerReport",
    "Moments",
    "PruneReport",
    "Pruner",
    "RelevanceDecay",
    "RelevanceDecayOptimizer",
    "ScoringContext",
    "SequentialReport",
    "StructuredReport",
    "__version__",
    "apply_masks_from_state_dict",
    "export_model",
    "export_semi_structured",
    "finalize",
    "finetune",
    "get_masks",
    "gram",
    "iterative_prune",
    "load_compact",
    "merge_moments",
    "moments",
    "prune",
    "prune_neurons",
    "prune_sequential",
    "register_importance",
    "remove_masks",
    "save_compact",
    "score",
]
