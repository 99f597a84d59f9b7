"""Pruning masks through ``torch.nn.utils.prune``: install, read, save/load and make permanent.

A pruned layer holds ``weight_orig`` (a parameter) and ``weight_mask`` (a buffer); a forward pre-hook
recomputes ``weight = weight_orig * weight_mask``, so fine-tuning keeps the zeros, and both travel in
``state_dict``. Zeros alone make a model neither smaller nor faster: see the README.

Every function here that changes a model checks its arguments first and then changes the model
inside :func:`~ecp_fast.pruning.transaction.model_transaction`: it succeeds completely or leaves
the model exactly as it was.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ecp_fast._arguments import check_module
from ecp_fast.pruning.transaction import model_transaction

logger = logging.getLogger(__name__)

#: Layers that can receive a compensated bias when a saved model has one and the layer has none.
BIAS_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models pruned with ``torch.nn.utils.prune``.

    Pruning stores the masked weight as a computed (non-leaf) tensor attribute, which
    ``copy.deepcopy`` refuses; the copy gets a detached clone instead (the pruning hook recomputes it
    at the next forward pass, so nothing is lost).
    """
    check_module(model)
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def weight_reparametrization(module: nn.Module, name: str = "weight") -> str | None:
    """How ``module.<name>`` is re-parametrised other than by a pruning mask, or None.

    Detects ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``orthogonal``, ...)
    and the hooks of the old-style ``torch.nn.utils.weight_norm`` / ``spectral_norm``.
    """
    if parametrize.is_parametrized(module, name):
        parametrizations = module.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)  # torch keeps them by tensor name
        entries = parametrizations[name]
        assert isinstance(entries, nn.ModuleList)  # a ParametrizationList
        kinds = ", ".join(type(p).__name__ for p in entries)
        return f"torch.nn.utils.parametrize: {kinds}"
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            continue
        if getattr(hook, "name", None) == name:
            return f"{type(hook).__name__} hook"
    return None


def check_maskable(module: nn.Module, layer: str | None = None) -> None:
    """Raise ``ValueError`` unless ``module.weight`` can take a ``torch.nn.utils.prune`` mask.

    ``layer`` names the module in the message. A weight behind ``weight_norm`` or any other
    parametrization cannot: the mask would act on a computed tensor.
    """
    label = repr(layer) if layer is not None else type(module).__name__
    kind = weight_reparametrization(module)
    if kind is not None:
        raise ValueError(
            f"layer {label} has a parametrized weight (weight_norm/parametrize; found {kind}); "
            "remove the parametrization or exclude the layer"
        )
    if _stored_weight(module) is None:
        raise ValueError(f"layer {label} ({type(module).__name__}) has no weight tensor to mask")


def _check_mask(mask: Any, weight: torch.Tensor, what: str) -> None:
    """Raise unless ``mask`` is a tensor of ``weight``'s shape holding only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{what} must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what} must hold only 0 (removed) and 1 (kept), got other values")


def install_mask(module: nn.Module, mask: torch.Tensor, name: str | None = None) -> None:
    """Mask ``module.weight`` with ``mask`` (1 keeps, 0 removes), combining with an existing mask.

    ``name`` labels the layer in errors. Raises ``ValueError`` for a parametrized weight, a mask of
    the wrong shape or with values other than 0 and 1; the module is then unchanged.
    """
    check_maskable(module, name)
    weight = _stored_weight(module)
    assert weight is not None  # check_maskable
    what = "install_mask: argument 'mask'" + (f" of layer {name!r}" if name is not None else "")
    _check_mask(mask, weight, what)
    with model_transaction(module, values=False):
        torch_prune.custom_from_mask(module, "weight", mask.to(device=weight.device))


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight_mask}`` for every module whose weight is pruned through ``torch.nn.utils.prune``.

    Weight masks only, keyed by the layer's name (callers read each value as the mask of that
    layer's weight): a mask on another tensor, such as ``bias_mask``, is not returned. Read it as
    ``model.get_submodule(name).bias_mask``; :func:`remove_masks` makes every mask permanent.
    """
    check_module(model)
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


def _has_pruning_hook(module: nn.Module, name: str = "weight") -> bool:
    return any(
        isinstance(hook, torch_prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name
        for hook in module._forward_pre_hooks.values()
    )


def _pruned_tensors(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` that carry a pruning mask: by ``<name>_orig`` + ``<name>_mask`` or a hook."""
    names = [
        name[: -len("_orig")]
        for name in module._parameters
        if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask")
    ]
    for hook in module._forward_pre_hooks.values():
        hooked = getattr(hook, "_tensor_name", None) if isinstance(hook, torch_prune.BasePruningMethod) else None
        if isinstance(hooked, str) and hooked not in names:
            names.append(hooked)
    return names


def _check_removable(name: str, module: nn.Module, tensor: str) -> None:
    """``ValueError`` unless ``tensor`` of layer ``name`` is pruned in full: ``_orig``, ``_mask`` and the hook."""
    has_parts = hasattr(module, f"{tensor}_orig") and hasattr(module, f"{tensor}_mask")
    if has_parts and not _has_pruning_hook(module, tensor):
        raise ValueError(
            f"remove_masks: layer {name!r} has {tensor}_orig and {tensor}_mask but no torch.nn.utils.prune hook; "
            "expected a layer pruned with torch.nn.utils.prune"
        )
    if not has_parts:
        raise ValueError(
            f"remove_masks: layer {name!r} has a torch.nn.utils.prune hook for {tensor!r} but no {tensor}_orig and "
            f"{tensor}_mask; expected both, as torch.nn.utils.prune installs them"
        )


def storage_key(tensor: torch.Tensor) -> tuple[str, int] | int:
    """What identifies the memory of ``tensor``: its storage (views and tied parameters share it), or
    (no memory to share: empty, meta, sparse, a subclass without one storage) the tensor itself."""
    if tensor.numel() == 0 or tensor.is_meta or tensor.layout != torch.strided:
        return id(tensor)
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without one storage (2:4 weights)
        return id(tensor)


#: ``{storage: {(module, parameter name): "path.name"}}``: every place a parameter is held (:func:`parameter_holders`).
Holders = dict[tuple[str, int] | int, dict[tuple[nn.Module, str], str]]


def parameter_holders(model: nn.Module) -> Holders:
    """Every path to every parameter of ``model``, grouped by the memory they hold (:func:`storage_key`)."""
    holders: Holders = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module._parameters.items():
            if parameter is not None:
                where = f"{path}.{name}" if path else name
                holders.setdefault(storage_key(parameter), {}).setdefault((module, name), where)
    return holders


def untie(module: nn.Module, name: str) -> None:
    """Give ``module`` a copy of its parameter ``name`` of its own (what shared it keeps the original)."""
    shared = module._parameters[name]
    assert shared is not None  # the callers found it among the module's parameters
    module._parameters[name] = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)


def fold_mask(module: nn.Module, layer: str, tensor: str, holders: Holders) -> None:
    """``torch.nn.utils.prune.remove(module, tensor)``, on a copy of its own where the masked tensor is
    shared with other parameters of the model (``holders``, :func:`parameter_holders`, updated): the fold
    writes the masked values into the stored tensor, which would zero them in the other holders too."""
    name = tensor + "_orig"
    stored = module._parameters[name]
    assert stored is not None  # the caller found the mask on it
    sharing = holders.get(storage_key(stored), {})
    sharing.pop((module, name), None)  # after the fold this module no longer holds it
    if sharing:
        untie(module, name)
        logger.warning(
            "layer %r: its pruned %r is shared with %s; its mask is folded into a copy of its own, so that the "
            "others keep their values (the tie is undone)",
            layer,
            tensor,
            ", ".join(sorted(sharing.values())),
        )
    torch_prune.remove(module, tensor)


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent (``prune.remove``): plain parameters with zeros remain.

    Every tensor that ``torch.nn.utils.prune`` masks is folded (``weight``, ``bias`` or any other
    name); a masked tensor shared with other parameters (tied weights) is folded into a copy of the
    masked layer's own, so the others keep their values (a warning names them). Returns the names of
    the layers with at least one mask removed, in module order. Raises ``ValueError`` (model
    unchanged) when a layer holds ``<name>_orig`` / ``<name>_mask`` without the pruning hook, or a
    hook without them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_masks: argument 'model' must be an nn.Module, got {type(model).__name__}")
    masked = [(name, module, _pruned_tensors(module)) for name, module in model.named_modules()]
    masked = [(name, module, tensors) for name, module, tensors in masked if tensors]
    for name, module, tensors in masked:
        for tensor in tensors:
            _check_removable(name, module, tensor)
    holders = parameter_holders(model)
    with model_transaction(model):
        for name, module, tensors in masked:
            for tensor in tensors:
                fold_mask(module, name or type(module).__name__, tensor, holders)
    return [name for name, _, _ in masked]


# ---- loading -------------------------------------------------------------------------------------


@dataclass
class _LoadPlan:
    """What :func:`apply_masks_from_state_dict` will do, computed before anything changes."""

    masks: list[tuple[str, nn.Module, torch.Tensor]]
    biases: list[tuple[str, nn.Module, int]]
    masked: list[str]


def _stored_weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight_orig", None) if hasattr(module, "weight_mask") else getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _entries(
    state_dict: Mapping[str, Any], suffix: str, modules: Mapping[str, nn.Module]
) -> Iterator[tuple[str, str, nn.Module | None, Any]]:
    """``(key, layer name, module or None, value)`` of every key ending in ``suffix``; keys must be strings."""
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"apply_masks_from_state_dict: argument 'state_dict' must have string keys, got {key!r}")
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            yield key, name, modules.get(name), value


def _plan_masks(modules: Mapping[str, nn.Module], state_dict: Mapping[str, Any]) -> tuple[list, list[str]]:
    masks, masked = [], []
    for key, name, module, mask in _entries(state_dict, ".weight_mask", modules):
        if module is None:
            raise ValueError(f"apply_masks_from_state_dict: state_dict key {key!r} names no module of the model")
        check_maskable(module, name)
        weight = _stored_weight(module)
        assert weight is not None  # check_maskable
        _check_mask(mask, weight, f"apply_masks_from_state_dict: state_dict[{key!r}]")
        if not hasattr(module, "weight_mask"):
            masks.append((name, module, mask))
        masked.append(name)
    return masks, masked


def _check_weight_orig(modules: Mapping[str, nn.Module], state_dict: Mapping[str, Any]) -> None:
    """Every ``<layer>.weight_orig`` comes with its mask and has the layer's weight shape."""
    for key, name, module, orig in _entries(state_dict, ".weight_orig", modules):
        if module is None:
            continue  # a key of no module: load_state_dict reports it
        if f"{name}.weight_mask" not in state_dict:
            raise ValueError(
                f"apply_masks_from_state_dict: argument 'state_dict' has '{name}.weight_orig' but no "
                f"'{name}.weight_mask'; a pruned layer is saved with both"
            )
        weight = _stored_weight(module)
        if not isinstance(orig, torch.Tensor) or weight is None or tuple(orig.shape) != tuple(weight.shape):
            expected = None if weight is None else tuple(weight.shape)
            got = tuple(orig.shape) if isinstance(orig, torch.Tensor) else type(orig).__name__
            raise ValueError(
                f"apply_masks_from_state_dict: state_dict[{key!r}] must be a tensor of the weight's shape "
                f"{expected}, got {got}"
            )


def _plan_biases(modules: Mapping[str, nn.Module], state_dict: Mapping[str, Any]) -> list[tuple[str, nn.Module, int]]:
    biases: list[tuple[str, nn.Module, int]] = []
    for key, name, module, bias in _entries(state_dict, ".bias", modules):
        if not isinstance(module, BIAS_LAYERS):
            continue
        if not isinstance(bias, torch.Tensor):
            raise TypeError(
                f"apply_masks_from_state_dict: state_dict[{key!r}] must be a tensor, got {type(bias).__name__}"
            )
        weight = _stored_weight(module)
        outputs = int(weight.shape[0]) if weight is not None else -1
        if tuple(bias.shape) != (outputs,):
            raise ValueError(
                f"apply_masks_from_state_dict: state_dict[{key!r}] must have shape ({outputs},) (the outputs of "
                f"layer {name!r}), got {tuple(bias.shape)}"
            )
        if module.bias is None:
            biases.append((name, module, outputs))
    return biases


def _add_zero_bias(module: nn.Module, outputs: int) -> None:
    weight = _stored_weight(module)
    assert weight is not None  # checked by _plan_biases
    zeros = torch.zeros(outputs, dtype=weight.dtype, device=weight.device)
    module.bias = nn.Parameter(zeros, requires_grad=weight.requires_grad)  # trainable as the weight is


def apply_masks_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Re-create the pruning re-parametrisation a saved ``state_dict`` expects, before ``load_state_dict``.

    For every ``<layer>.weight_mask`` in ``state_dict`` the layer gets that mask; a ``<layer>.bias``
    saved for a layer that has none (a bias added by compensation) gets a zero bias parameter.
    Returns the names of the masked layers. Then call ``model.load_state_dict(state_dict)``.

    The whole ``state_dict`` is checked before the model changes: every mask names an existing,
    maskable layer (no parametrized weight), has the weight's shape and holds only 0 and 1, and
    every bias of a Linear / Conv layer has shape ``(out,)``. ``TypeError`` / ``ValueError``
    otherwise, with the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"apply_masks_from_state_dict: argument 'model' must be an nn.Module, got {type(model).__name__}"
        )
    if not isinstance(state_dict, Mapping):
        hint = " (load the file first: torch.load(path))" if isinstance(state_dict, (str, bytes)) else ""
        raise TypeError(
            "apply_masks_from_state_dict: argument 'state_dict' must be a mapping of names to tensors"
            f"{hint}, got {type(state_dict).__name__}"
        )
    modules = dict(model.named_modules())
    masks, masked = _plan_masks(modules, state_dict)
    _check_weight_orig(modules, state_dict)
    plan = _LoadPlan(masks, _plan_biases(modules, state_dict), masked)
    with model_transaction(model, values=False):
        for _name, module, mask in plan.masks:
            weight = _stored_weight(module)
            assert weight is not None  # check_maskable in _plan_masks
            torch_prune.custom_from_mask(module, "weight", mask.to(device=weight.device))
        for name, module, outputs in plan.biases:
            _add_zero_bias(module, outputs)
            logger.info("added a bias to %r to load the compensated bias of the saved model", name)
    return plan.masked
