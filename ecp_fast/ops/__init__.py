"""The ``ecp`` custom ops: declared once here, with fake kernels and typed Python wrappers.

Backends register implementations of these schemas:

* CPU tensors: the fused multithreaded C++ kernel in ``csrc/`` (``TORCH_LIBRARY_IMPL(ecp, CPU)``),
  or, when it was not built, the reference implementation with a warning.
* CUDA tensors: the Triton kernels in ``ecp_fast/triton`` (registered when CUDA and Triton exist).
* Meta / FakeTensor: the fake kernels below, so ``torch.compile`` and shape propagation work.

All three ops return sums over samples (METHOD.md), in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ecp_fast.ops import _native, reference
from ecp_fast.ops._checks import check_finalize_inputs, check_layer_inputs, result_dtype
from ecp_fast.ops.merge import Moments

logger = logging.getLogger(__name__)

SCHEMAS = {
    "moments": "moments(Tensor x, Tensor g) -> (Tensor s0, Tensor mean, Tensor m2)",
    "score": "score(Tensor x, Tensor g, Tensor weight, bool compensate=True) -> (Tensor importance, Tensor bias_delta)",
    "finalize": "finalize(Tensor s0, Tensor mean, Tensor m2, Tensor weight) -> (Tensor importance, Tensor bias_delta)",
}

_library = torch.library.Library("ecp", "DEF")
for _schema in SCHEMAS.values():
    _library.define(_schema)


# ---- fake kernels: shapes and dtypes only, contiguous like the real kernels' outputs -------------


@torch.library.register_fake("ecp::moments")
def _moments_fake(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = check_layer_inputs("ecp.moments", x, g)
    dtype = result_dtype(x, g)
    return (
        x.new_empty((shape.fan_out,), dtype=dtype),
        x.new_empty((shape.fan_out, shape.fan_in), dtype=dtype),
        x.new_empty((shape.fan_out, shape.fan_in), dtype=dtype),
    )


@torch.library.register_fake("ecp::score")
def _score_fake(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = check_layer_inputs("ecp.score", x, g, weight)
    dtype = result_dtype(x, g, weight)
    size = (shape.fan_out, shape.fan_in)
    return x.new_empty(size, dtype=dtype), x.new_empty(size, dtype=dtype)


@torch.library.register_fake("ecp::finalize")
def _finalize_fake(
    s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_finalize_inputs("ecp.finalize", s0, mean, m2, weight)
    dtype = result_dtype(s0, mean, m2, weight)
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty(weight.shape, dtype=dtype)


# ---- backends ------------------------------------------------------------------------------------

NATIVE_CPU = _native.load()
if not NATIVE_CPU:
    # Keep the ops usable (slowly) on CPU when the extension is missing.
    for _name in SCHEMAS:
        _library.impl(_name, getattr(reference, _name), "CPU")


def _register_cuda_kernels() -> bool:
    """Register the Triton kernels for CUDA tensors when CUDA and Triton are both present."""
    if not torch.cuda.is_available():
        return False
    try:
        from ecp_fast.ops.triton import register_cuda_kernels
    except ImportError as error:
        warnings.warn(
            f"ecp_fast: CUDA is available but the Triton kernels could not be imported ({error}); "
            "ecp ops on CUDA tensors are unavailable. Install triton.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    try:
        register_cuda_kernels()
    except Exception as error:  # a broken GPU stack must not make the CPU package unusable
        warnings.warn(
            f"ecp_fast: registering the Triton kernels for CUDA failed ({type(error).__name__}: {error}); "
            "ecp ops on CUDA tensors are unavailable.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


TRITON_CUDA = _register_cuda_kernels()


# ---- typed wrappers ------------------------------------------------------------------------------


def moments(x: torch.Tensor, g: torch.Tensor) -> Moments:
    """Sensitivity-weighted moments ``(s0, mean, m2)`` of a layer's inputs, one fused pass.

    Args:
        x: layer inputs ``(N, in)``; extra leading dimensions are more samples.
        g: output gradients ``(N, out)``, or ``(P, N, out)`` with sensitivity ``c = sum_p g_p^2``.

    Returns:
        ``Moments(s0 (out,), mean (out, in), m2 (out, in))``; mergeable with :func:`merge_moments`.
    """
    return Moments(*torch.ops.ecp.moments.default(x, g))


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and optimal bias shift of every weight of a layer, one fused pass.

    With ``compensate=True`` (ECP) ``importance = w^2 m2`` and ``bias_delta = w mean``; with
    ``compensate=False`` ``importance = w^2 sum_s c a^2`` and ``bias_delta`` is zeros.
    Both outputs are ``(out, in)``.
    """
    importance, bias_delta = torch.ops.ecp.score.default(x, g, weight, compensate)
    return importance, bias_delta


def finalize(
    s0: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance and bias shift from accumulated moments (after streaming or merging)."""
    importance, bias_delta = torch.ops.ecp.finalize.default(s0, mean, m2, weight)
    return importance, bias_delta
