"""Export N:M-pruned Linear layers to torch's semi-structured (2:4) sparse format.

A 2:4 mask (``Pruner.prune(scope="2:4")``) keeps at most two of every four consecutive inputs of a
neuron. NVIDIA GPUs from Ampere on (compute capability 8.0 and later) multiply such weights with sparse
tensor cores; torch exposes them through :func:`torch.sparse.to_sparse_semi_structured`, for
float16 / bfloat16 / int8 weights on CUDA whose shapes meet the backend's minimum sizes.

**On CPU this is not faster.** torch has no CPU kernel for semi-structured sparse tensors, and a
2:4-masked dense weight costs exactly as much as the dense one (the zeros are multiplied like any
other number). :func:`export_semi_structured` therefore validates the pattern and, without CUDA,
logs a warning and returns the model unchanged. On CPU, real speed comes from a CSR export of
unstructured sparsity (:func:`ecp_fast.export.export` with ``format="csr"``) or from removing whole
neurons (:mod:`ecp_fast.pruning.structured`). ``export(model, "2:4")`` wraps this function on a copy
and raises instead of warning on CPU.

**On a GPU it pays for large batches only**: on an H200, 1.3-1.5x faster than dense at 16384
tokens per call for most layers measured, but mostly slower at 4096 tokens and below (docs/gpu.md).
``export(model, "2:4", example_inputs=...)`` times every layer on the inputs it receives and converts
only those that win (:func:`choose_two_four_layers`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast._arguments import check_module
from ecp_fast.export.measure import capture_layer_inputs, faster, time_forms
from ecp_fast.pruning.calibration import weight_2d, weight_parameter

logger = logging.getLogger(__name__)

#: The one pattern torch's semi-structured sparse tensors support.
SUPPORTED_PATTERN = "2:4"
#: Weight dtypes the semi-structured kernels accept (CUTLASS also takes float32 on some versions).
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


class NMPatternError(ValueError):
    """A weight that does not follow the requested N:M pattern."""


@dataclass(frozen=True)
class NMPattern:
    """Keep at most ``n`` nonzeros in every ``m`` consecutive inputs of a row."""

    n: int
    m: int


def parse_pattern(pattern: str) -> NMPattern:
    """``"2:4"`` -> ``NMPattern(2, 4)``; ``ValueError`` for anything that is not ``N:M`` with ``0 < N < M``."""
    if not isinstance(pattern, str) or pattern.count(":") != 1:
        raise ValueError(f"argument 'pattern' must be a string 'N:M' such as '2:4', got {pattern!r}")
    left, right = pattern.split(":")
    if not (left.strip().isdigit() and right.strip().isdigit()):
        raise ValueError(f"argument 'pattern' must be two integers 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(left), int(right)
    if not 0 < n < m:
        raise ValueError(f"argument 'pattern' needs 0 < N < M, got N={n}, M={m}")
    return NMPattern(n, m)


def check_n_m(weight: torch.Tensor, pattern: str = SUPPORTED_PATTERN, name: str = "weight") -> None:
    """Raise :class:`NMPatternError` unless every group of ``m`` consecutive inputs of every row of
    ``weight`` (viewed as ``(out, in)``) holds at most ``n`` nonzeros.

    The error names the layer, the first offending row and input group and how many nonzeros it holds.
    """
    parsed = parse_pattern(pattern)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"argument 'weight' must be a tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise NMPatternError(f"layer {name!r}: expected a weight with at least 2 dimensions, got {weight.dim()}")
    if weight.numel() == 0:
        return  # no group to check
    matrix = weight.detach().reshape(weight.shape[0], -1)
    fan_out, fan_in = matrix.shape
    if fan_in % parsed.m:
        raise NMPatternError(
            f"layer {name!r}: pattern {pattern} needs the input size to be a multiple of {parsed.m}, got {fan_in}"
        )
    counts = (matrix != 0).reshape(fan_out, fan_in // parsed.m, parsed.m).sum(dim=-1)
    bad = counts > parsed.n
    if bool(bad.any()):
        row, group = (int(v) for v in torch.nonzero(bad)[0])
        raise NMPatternError(
            f"layer {name!r} is not {pattern} sparse: row {row}, "
            f"inputs {group * parsed.m}..{group * parsed.m + parsed.m - 1} "
            f"hold {int(counts[row, group])} nonzeros (at most {parsed.n} allowed); {int(bad.sum())} of "
            f"{bad.numel()} groups violate the pattern. Prune with Pruner.prune(scope='{pattern}') first"
        )


def semi_structured_available(device: torch.device | str | None = None) -> bool:
    """True when ``device`` (default: the current CUDA device) can run semi-structured sparse weights.

    torch has two backends: CUTLASS, whose kernels run on compute capability 8.x only (on a Hopper
    GPU, sm_90, the first forward fails with "Supported only on GPUs with compute capability 8.x"),
    and cuSPARSELt, the default where torch has it, for 8.0 and later. So: capability 8.x, or a later
    one with cuSPARSELt present and not overridden by ``SparseSemiStructuredTensor._FORCE_CUTLASS``.
    """
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return False
    major = torch.cuda.get_device_capability(device)[0]
    if major < 8:
        return False
    return major == 8 or (_cusparselt_available() and not torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS)


def _cusparselt_available() -> bool:
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available())


def _select_linears(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    if layers is None:
        return {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
    if isinstance(layers, str):
        raise TypeError(f"argument 'layers' must be a sequence of layer names, got the string {layers!r}")
    selected = {}
    for name in layers:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"argument 'layers': {name!r} must name an nn.Linear of the model, got "
                f"{type(module).__name__ if module is not None else 'no module'}"
            )
        selected[name] = module
    return selected


def _check_dtypes(linears: Mapping[str, nn.Module]) -> None:
    """ValueError naming the first layer whose weight the semi-structured kernels do not take."""
    for name, module in linears.items():
        dtype = weight_2d(module).dtype
        if dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(
                f"layer {name!r}: semi-structured sparse weights must be float16, bfloat16 or int8, "
                f"got {dtype}; convert the model first (model.half())"
            )


def _semi_structured_weights(linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The semi-structured sparse form of every layer's effective weight; ValueError naming the first that fails."""
    from torch.sparse import to_sparse_semi_structured

    _check_dtypes(linears)
    converted: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        weight = weight_2d(module).contiguous()
        try:
            converted[name] = to_sparse_semi_structured(weight)
        except RuntimeError as error:
            raise ValueError(
                f"layer {name!r} with weight {tuple(weight.shape)} cannot be converted: {error}"
            ) from error
    return converted


def export_semi_structured(
    model: nn.Module, layers: Sequence[str] | None = None, pattern: str = SUPPORTED_PATTERN
) -> nn.Module:
    """Replace the weights of 2:4-sparse Linear layers by semi-structured sparse tensors (CUDA only).

    Args:
        model: the pruned model. Pruning masks (``torch.nn.utils.prune``) of the converted layers are
            made permanent first.
        layers: names of the Linear layers to convert; None converts every ``nn.Linear`` (and then
            every one must be 2:4 sparse).
        pattern: must be ``"2:4"``, the only pattern the sparse kernels support.

    Returns:
        The same model object. On a GPU that runs them (:func:`semi_structured_available`), its selected weights are
        ``SparseSemiStructuredTensor`` parameters (as in torch's semi-structured sparsity tutorial):
        the weights must be float16, bfloat16 or int8 on the GPU and meet the backend's shape
        minimums. Without CUDA (or on a CPU model) it is returned unchanged with a logged warning:
        on CPU a 2:4 weight is not faster than a dense one.

    Raises:
        NMPatternError: a selected weight is not 2:4 sparse (checked first, on every device).
        ValueError: a bad ``pattern`` or layer name, or a dtype or shape the kernels do not accept.
    """
    check_module(model)
    parse_pattern(pattern)
    if pattern.replace(" ", "") != SUPPORTED_PATTERN:
        raise ValueError(f"argument 'pattern': semi-structured sparse tensors support only '2:4', got {pattern!r}")
    linears = _select_linears(model, layers)
    if not linears:
        raise ValueError("argument 'model': no nn.Linear layer to export")
    for name, module in linears.items():
        check_n_m(weight_2d(module), pattern, name)
    devices = {weight_parameter(module).device for module in linears.values()}
    if not all(semi_structured_available(device) for device in devices):
        logger.warning(
            "2:4 export skipped: semi-structured sparse kernels need CUDA on a GPU of compute capability 8.x, or a "
            "later one with cuSPARSELt "
            "(found devices %s); on CPU a 2:4 weight is no faster than a dense one, the model is returned "
            "unchanged. For CPU speed use ecp_fast.export.export(model, 'csr') or remove whole neurons "
            "(ecp_fast.pruning.structured.prune_neurons).",
            sorted(str(device) for device in devices),
        )
        return model
    converted = _semi_structured_weights(linears)
    # Every conversion succeeded; only now change the model.
    for name, module in linears.items():
        if hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
        module.weight = nn.Parameter(converted[name], requires_grad=False)
    logger.info("converted %d Linear layers to 2:4 semi-structured sparse weights", len(converted))
    return model


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(inputs, weight, bias)


def choose_two_four_layers(
    model: nn.Module, linears: Mapping[str, nn.Linear], example_inputs: Any, rounds: int = 11
) -> list[str]:
    """The names of ``linears`` (2:4-sparse layers of ``model``, on a GPU that runs semi-structured
    weights) that are faster as semi-structured weights on the inputs they receive when ``model``
    runs on ``example_inputs``: timed dense and 2:4 in interleaved rounds, 2:4 chosen when at least
    :data:`~ecp_fast.export.measure.MEASURE_MARGIN` faster. A layer that did not run is converted.

    On an H200 a 2:4 layer was 0.8-1.5x as fast as dense at 16384 tokens and up to 20x slower at
    1024 (a fixed cost per call; docs/gpu.md), so the batch in ``example_inputs`` decides.
    """
    _check_dtypes(linears)  # before any timing
    inputs = capture_layer_inputs(model, linears, example_inputs)
    chosen = []
    for name, linear in linears.items():
        x = inputs.get(name)
        if x is None:
            logger.info("layer %r did not run on example_inputs: converted to 2:4 untimed", name)
            chosen.append(name)
            continue
        sparse = functools.partial(_linear, weight=_semi_structured_weights({name: linear})[name], bias=linear.bias)
        dense_seconds, sparse_seconds = time_forms(linear, sparse, x, rounds)
        if faster(dense_seconds, sparse_seconds):
            chosen.append(name)
        logger.info(
            "layer %r on input %s: dense %.3g ms, 2:4 %.3g ms: %s",
            name,
            tuple(x.shape),
            dense_seconds * 1e3,
            sparse_seconds * 1e3,
            "2:4" if name in chosen else "stays dense",
        )
    return chosen
