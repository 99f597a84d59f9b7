"""ecp_fast: elimination-compensation pruning (ECP) for PyTorch.

Fused ops (``torch.ops.ecp.moments``, ``ecp.score``, ``ecp.finalize``) compute, for every weight of
a layer at once, the importance that already accounts for the best shift of its neuron's bias;
see ``ecp_fast.ops`` for the contract and ``ecp_fast.reference`` for the plain-PyTorch oracle.
"""

from ecp_fast.moments import Moments, merge_moments
from ecp_fast.ops import finalize, moments, score
from ecp_fast.calibration import LayerStatistics, merge_statistics
from ecp_fast.finetune import finetune
from ecp_fast.importance import IMPORTANCES, Importance, register_importance
from ecp_fast.masks import apply_masks_from_state_dict, get_masks, remove_masks
from ecp_fast.pruner import LayerReport, PruneReport, Pruner, prune
from ecp_fast.distributed import broadcast_module, per_rank_probe_seed, shard, synchronize_calibration
from ecp_fast.sequential import SequentialReport, prune_sequential
from ecp_fast.datasets import load_digits_split, load_mnist
from ecp_fast.iterative import ECPCriterion, IterativeResult, iterative_prune
from ecp_fast.regularize import GammaSchedule, RelevanceDecay, RelevanceDecayOptimizer, eligible_weights
from ecp_fast.sparse_export import NMPatternError, check_n_m, export_semi_structured
from ecp_fast.structured import NeuronPair, StructuredReport, find_neuron_pairs, prune_neurons

__version__ = "0.1.0"

__all__ = [
    "Moments", "finalize", "merge_moments", "moments", "score", "__version__",
    "IMPORTANCES", "Importance", "LayerReport", "LayerStatistics", "PruneReport", "Pruner",
    "apply_masks_from_state_dict", "finetune", "get_masks", "merge_statistics", "prune",
    "register_importance", "remove_masks",
    "NMPatternError", "NeuronPair", "StructuredReport", "check_n_m", "export_semi_structured",
    "find_neuron_pairs", "prune_neurons",
    "SequentialReport", "broadcast_module", "per_rank_probe_seed", "prune_sequential", "shard",
    "synchronize_calibration",
    "ECPCriterion", "GammaSchedule", "IterativeResult", "RelevanceDecay", "RelevanceDecayOptimizer",
    "eligible_weights", "iterative_prune", "load_digits_split", "load_mnist",
]
