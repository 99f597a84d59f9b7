"""Pruning masks through ``torch.nn.utils.prune``: install, read, save/load and make permanent.

A pruned layer holds ``weight_orig`` (a parameter) and ``weight_mask`` (a buffer); a forward pre-hook
recomputes ``weight = weight_orig * weight_mask``, so fine-tuning keeps the zeros, and both travel in
``state_dict``. Zeros alone make a model neither smaller nor faster: see the README.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

logger = logging.getLogger(__name__)


def install_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Mask ``module.weight`` with ``mask`` (1 keeps, 0 removes), combining with an existing mask."""
    weight = module.weight_orig if hasattr(module, "weight_orig") else module.weight
    if mask.shape != weight.shape:
        raise ValueError(
            f"install_mask: argument 'mask' must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}"
        )
    torch_prune.custom_from_mask(module, "weight", mask.to(device=weight.device))


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight_mask}`` for every module pruned through ``torch.nn.utils.prune``."""
    return {
        name: module.weight_mask.detach().clone()
        for name, module in model.named_modules()
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig")
    }


def has_pruning_hooks(model: nn.Module) -> bool:
    """True when any module carries a ``torch.nn.utils.prune`` re-parametrisation."""
    return any(
        isinstance(hook, torch_prune.BasePruningMethod)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent (``prune.remove``): plain ``weight`` parameters with zeros remain."""
    removed = []
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
            removed.append(name)
    return removed


def apply_masks_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Re-create the pruning re-parametrisation a saved ``state_dict`` expects, before ``load_state_dict``.

    For every ``<layer>.weight_mask`` in ``state_dict`` the layer gets that mask; a ``<layer>.bias``
    saved for a layer that has none (a bias added by compensation) gets a zero bias parameter.
    Returns the names of the masked layers. Then call ``model.load_state_dict(state_dict)``.
    """
    modules = dict(model.named_modules())
    masked = []
    for key, mask in state_dict.items():
        if not key.endswith(".weight_mask"):
            continue
        name = key[: -len(".weight_mask")]
        if name not in modules:
            raise ValueError(f"apply_masks_from_state_dict: state_dict key {key!r} names no module of the model")
        module = modules[name]
        if not hasattr(module, "weight_mask"):
            install_mask(module, mask)
        masked.append(name)
    for key, bias in state_dict.items():
        if not key.endswith(".bias"):
            continue
        name = key[: -len(".bias")]
        module = modules.get(name)
        if module is not None and isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(bias))
            logger.info("added a bias to %r to load the compensated bias of the saved model", name)
    return masked
