"""Pruning: calibration -> importance -> allocation -> selection -> masks and compensation.

Data flows one way through the modules of this package: :mod:`.calibration` streams per-layer
statistics through hooks, :mod:`.importance` turns them into scores (a registry of methods),
:mod:`.selection` picks the weights to remove within a scope, :mod:`.masks` installs the masks
through ``torch.nn.utils.prune`` and :mod:`.pruner` drives the pipeline. :mod:`.structured` removes
whole neurons and :mod:`.sequential` prunes block by block.
"""

from ecp_fast.pruning.calibration import LayerStatistics, merge_statistics
from ecp_fast.pruning.importance import Importance, ScoringContext, register_importance
from ecp_fast.pruning.masks import apply_masks_from_state_dict, get_masks, remove_masks
from ecp_fast.pruning.pruner import Pruner, prune
from ecp_fast.pruning.report import LayerReport, PruneReport
from ecp_fast.pruning.sequential import SequentialReport, prune_sequential
from ecp_fast.pruning.structured import NeuronPair, StructuredReport, find_neuron_pairs, prune_neurons

__all__ = [
    "Importance",
    "LayerReport",
    "LayerStatistics",
    "NeuronPair",
    "PruneReport",
    "Pruner",
    "ScoringContext",
    "SequentialReport",
    "StructuredReport",
    "apply_masks_from_state_dict",
    "find_neuron_pairs",
    "get_masks",
    "merge_statistics",
    "prune",
    "prune_neurons",
    "prune_sequential",
    "register_importance",
    "remove_masks",
]
