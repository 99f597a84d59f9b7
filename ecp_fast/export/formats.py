"""``export(model, format)``: a pruned model as a plain torch model in a format that makes its zeros pay.

- ``"dense"``: masks folded (``torch.nn.utils.prune.remove`` semantics): plain ``nn.Linear`` /
  ``nn.Conv2d`` with zeros in their weights. No faster, but no ecp_fast or pruning hooks needed.
- ``"csr"``: every plain ``nn.Linear`` that a crossover says is faster as CSR becomes a
  ``SparseCSRLinear`` GraphModule (see :mod:`ecp_fast.export.csr`); the rest stays dense, as does a
  Linear with hooks or a re-parametrised weight (``spectral_norm``, ...), with a logged warning.
  ``nn.Conv2d`` stays dense: its sparse form would need the unfolded input (``kh*kw`` times the
  activation memory) and torch's dense convolution (oneDNN) has no sparse counterpart on CPU.
- ``"2:4"``: 2:4-sparse ``nn.Linear`` weights become torch's semi-structured sparse tensors, on CUDA
  GPUs of compute capability 8.x, or later ones with cuSPARSELt (see :mod:`ecp_fast.export.semi_structured`).

The model given is never changed: the export works on a deep copy. A weight shared between layers
(tied) and masked in only some of them is untied in the copy, so that every layer keeps computing
what it did (see :func:`fold_masks`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ecp_fast._arguments import check_module
from ecp_fast.export.csr import (
    choose_csr_layers,
    is_csr_linear,
    replace_csr_with_dense,
    replace_with_csr,
    replaceable_linears,
)
from ecp_fast.export.measure import check_example_inputs
from ecp_fast.export.semi_structured import (
    NMPatternError,
    check_n_m,
    choose_two_four_layers,
    export_semi_structured,
    semi_structured_available,
)
from ecp_fast.pruning.masks import copy_model, fold_mask, parameter_holders

logger = logging.getLogger(__name__)

#: The formats :func:`export` knows.
FORMATS = ("dense", "csr", "2:4")


def fold_masks(model: nn.Module) -> list[str]:
    """Make every ``torch.nn.utils.prune`` mask of ``model`` permanent, in place; returns ``"layer.tensor"`` names.

    A masked tensor shared with another parameter of the model (tied weights: an embedding and an
    output head) is folded into a new parameter of the masked layer only, so the others keep their
    values; the tie is undone (a logged warning names the holders).
    """
    check_module(model)
    holders = parameter_holders(model)
    folded = []
    for module_name, module in model.named_modules():
        for name, _ in list(module.named_parameters(recurse=False)):
            base = name[: -len("_orig")]
            if name.endswith("_orig") and hasattr(module, base + "_mask"):
                fold_mask(module, module_name or type(module).__name__, base, holders)
                folded.append(f"{module_name}.{base}" if module_name else base)
    return folded


def exported_layers(model: nn.Module) -> dict[str, str]:
    """``{layer name: "csr" | "2:4" | "dense"}`` for the Linear, CSR and Conv2d layers of a model."""
    check_module(model)
    kinds = {}
    for name, module in model.named_modules():
        if is_csr_linear(module):
            kinds[name] = "csr"
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            semi = type(weight.data).__name__.startswith("SparseSemiStructuredTensor")
            kinds[name] = "2:4" if semi else "dense"
    return kinds


def _check_arguments(model: Any, format: Any, max_density: Any, example_inputs: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(format, str):
        raise TypeError(f"argument 'format' must be a string, one of {FORMATS}, got {type(format).__name__}")
    if format not in FORMATS:
        raise ValueError(f"argument 'format' must be one of {FORMATS}, got {format!r}")
    if format != "csr" and max_density is not None:
        raise ValueError(f"argument 'max_density' applies to format='csr' only, got format={format!r}")
    if format == "dense" and example_inputs is not None:
        raise ValueError("argument 'example_inputs' applies to format='csr' and '2:4' only, got format='dense'")
    if max_density is not None and (isinstance(max_density, bool) or not isinstance(max_density, (int, float))):
        raise TypeError(f"argument 'max_density' must be a float in [0, 1] or None, got {type(max_density).__name__}")
    if max_density is not None and example_inputs is not None:
        # One or the other decides which layers become CSR; silently preferring one would hide the other.
        raise ValueError(
            "arguments 'max_density' and 'example_inputs' exclude each other: max_density converts the layers of "
            "at most that density, example_inputs times each layer; got both"
        )
    if example_inputs is not None:
        check_example_inputs(example_inputs)


def _to_two_four(model: nn.Module, example_inputs: Any = None) -> None:
    """Convert the 2:4-sparse Linear layers of a mask-folded copy (with ``example_inputs``: those that
    run faster so on them); the rest stays dense."""
    linears = replaceable_linears(model)
    if not linears:
        raise ValueError("argument 'model': it has no nn.Linear layer to export to '2:4'")
    devices = sorted({str(module.weight.device) for module in linears.values()})
    if not all(semi_structured_available(device) for device in devices):
        raise ValueError(
            f"argument 'format': '2:4' needs semi-structured sparse kernels, on a CUDA GPU of compute capability "
            f"8.x, or a later one with cuSPARSELt, with the model on it; the model's Linear layers are on {devices}"
            f"{'' if torch.cuda.is_available() else ' and CUDA is not available'}. On CPU use format='csr'"
        )
    eligible = []
    for name, module in linears.items():
        try:
            check_n_m(module.weight, "2:4", name)
            eligible.append(name)
        except NMPatternError as error:
            logger.info("layer %r stays dense: %s", name, error)
    if not eligible:
        raise ValueError("argument 'model': no nn.Linear layer is 2:4 sparse; prune with scope='2:4' first")
    if example_inputs is not None:
        eligible = choose_two_four_layers(model, {name: linears[name] for name in eligible}, example_inputs)
        if not eligible:
            logger.warning("no 2:4 layer ran faster than dense on example_inputs: the export stays dense")
            return
    export_semi_structured(model, layers=eligible)


def export(
    model: nn.Module,
    format: str = "dense",
    *,
    max_density: float | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """A deep copy of ``model`` with its pruning masks folded, in ``format``; ``model`` is not changed.

    Args:
        model: a model, pruned (``torch.nn.utils.prune`` masks) or with zeros in its weights; CSR
            layers of an earlier export are accepted too (``format="dense"`` turns them back).
        format: ``"dense"``, ``"csr"`` or ``"2:4"`` (see the module docstring).
        max_density: ``"csr"`` only: convert exactly the Linear layers of at most this weight density.
        example_inputs: ``"csr"`` and ``"2:4"``, not with ``max_density``: a tensor (or a tuple of
            positional arguments) for ``model``; each Linear is timed dense and CSR (or 2:4) on the
            input it receives, and the sparse form wins when 10% faster. Without it, ``"csr"`` follows
            ``max_density`` or the modelled crossover (:func:`ecp_fast.export.csr.modelled_max_density`),
            and ``"2:4"`` converts every 2:4-sparse layer, which on a GPU is slower for small batches.

    Returns:
        A plain torch model: torch modules only (CSR layers are ``torch.fx.GraphModule``), so
        ``torch.save(exported)`` loads with ``torch.load(path, weights_only=False)`` without ecp_fast.

    Raises:
        TypeError: ``model`` is not a module, or an argument of the wrong type (``example_inputs``
            must be a tensor or a tuple).
        ValueError: an unknown ``format``; ``"2:4"`` without a suitable CUDA GPU; arguments that do not
            apply to the format; both ``max_density`` and ``example_inputs``; a model that does not
            run on ``example_inputs`` (the message gives their shapes).
    """
    _check_arguments(model, format, max_density, example_inputs)
    exported = copy_model(model)
    folded = fold_masks(exported)
    replace_csr_with_dense(exported)
    logger.info("folded %d pruning masks", len(folded))
    _convert(exported, format, max_density, example_inputs)
    return exported


def _convert(model: nn.Module, format: str, max_density: float | None, example_inputs: Any) -> None:
    """Convert a mask-folded, dense ``model`` in place to ``format`` (arguments already checked)."""
    if format == "csr":
        choices = choose_csr_layers(model, max_density=max_density, example_inputs=example_inputs)
        for choice in choices.values():
            logger.info(
                "layer %r %s, density %.4f: %s (%s)",
                choice.name,
                choice.shape,
                choice.density,
                "CSR" if choice.csr else "dense",
                choice.reason,
            )
        replace_with_csr(model, [name for name, choice in choices.items() if choice.csr])
    elif format == "2:4":
        _to_two_four(model, example_inputs)
