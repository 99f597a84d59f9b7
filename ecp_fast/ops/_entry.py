"""What every accelerator backend of the ops shares: the op's contract around the backend's own sums.

A backend (the fused Triton kernels in ``ecp_fast.ops.triton``, the library GEMMs in
``ecp_fast.ops.gemm``) supplies a *fill*: a function that writes float32 results into tensors it is
given. The entry points here check the arguments with the ops' words, refuse inputs that require grad
(for a direct call), send float64 to the float64 reference, answer empty layers without the backend,
and replace a result that came out non-finite by the float64 reference's (float32 sums overflow for
inputs near 1e19 and above while float64 ones stay finite), except during CUDA graph capture, where
the check would need a synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ecp_fast.ops import reference
from ecp_fast.ops._checks import (
    GramShape,
    LayerShape,
    check_bool,
    check_gram_inputs,
    check_layer_inputs,
    check_score_inputs,
    refuse_grad,
    result_dtype,
)

HALF_DTYPES = (torch.float16, torch.bfloat16)
Outputs = TypeVar("Outputs", torch.Tensor, tuple)

#: ``fill(op, shape, x, g, weight, compensate, (s0, first, second))``: with ``weight`` None, write
#: ``s0``, ``mean`` and ``m2``; with a weight, write ``importance`` and ``bias_delta`` into
#: ``first``/``second`` (``s0`` is then a placeholder, not written).
LayerFill = Callable[
    [
        str,
        LayerShape,
        torch.Tensor,
        torch.Tensor,
        "torch.Tensor | None",
        bool,
        tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ],
    None,
]
#: ``fill(shape, a, b, weight, h)``: add ``sum_s w_s [a_s; 1][b_s; 1]^T`` into the zeroed ``h``.
GramFill = Callable[[GramShape, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", torch.Tensor], None]


def with_float64_rescue(outputs: Outputs, recompute: Callable[[], Outputs]) -> Outputs:
    """``outputs`` when all finite, else ``recompute()`` (the float64 reference; see the module doc)."""
    tensors = outputs if isinstance(outputs, tuple) else (outputs,)
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return outputs
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return outputs
    return recompute()


def sensitivity_sum(g: torch.Tensor) -> torch.Tensor:
    """``s0 = sum_s sum_p g^2`` per output neuron, in float32 (for layers with no inputs)."""
    return g.float().square().reshape(-1, g.shape[-1]).sum(dim=0)


def moments(x: torch.Tensor, g: torch.Tensor, fill: LayerFill) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s0, mean, m2)`` as :func:`ecp_fast.ops.reference.moments`, the sums by ``fill``."""
    shape = check_layer_inputs("ecp.moments", x, g)
    refuse_grad("ecp.moments", x=x, g=g)  # the op's own autograd step, for a direct call
    if result_dtype(x, g) == torch.float64:
        return reference.moments(x, g)
    s0 = torch.zeros(shape.fan_out, device=x.device, dtype=torch.float32)
    mean = torch.zeros(shape.fan_out, shape.fan_in, device=x.device, dtype=torch.float32)
    m2 = torch.zeros_like(mean)
    if shape.fan_out == 0 or shape.n == 0:
        return s0, mean, m2
    if shape.fan_in == 0:
        return sensitivity_sum(g), mean, m2
    fill("ecp.moments", shape, x, g, None, True, (s0, mean, m2))
    return with_float64_rescue((s0, mean, m2), lambda: reference.moments(x, g))


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool, fill: LayerFill
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance, bias_delta)`` as :func:`ecp_fast.ops.reference.score`, the sums by ``fill``."""
    shape = check_score_inputs("ecp.score", x, g, weight)
    check_bool("ecp.score", "compensate", compensate)
    refuse_grad("ecp.score", x=x, g=g, weight=weight)
    if result_dtype(x, g, weight) == torch.float64:
        return reference.score(x, g, weight, compensate)
    importance = torch.zeros(shape.fan_out, shape.fan_in, device=x.device, dtype=torch.float32)
    bias_delta = torch.zeros_like(importance)
    if shape.fan_out == 0 or shape.fan_in == 0 or shape.n == 0:
        return importance, bias_delta
    placeholder = importance.new_empty(1)  # s0 is not an output of score
    fill("ecp.score", shape, x, g, weight, compensate, (placeholder, importance, bias_delta))
    return with_float64_rescue((importance, bias_delta), lambda: reference.score(x, g, weight, compensate))


def gram(
    a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor | None, float64: bool, fill: GramFill
) -> torch.Tensor:
    """``H`` as :func:`ecp_fast.ops.reference.gram`, float32 sums by ``fill``; float64 by the reference."""
    shape = check_gram_inputs("ecp.gram", a, b, weight)
    check_bool("ecp.gram", "float64", float64)
    refuse_grad("ecp.gram", a=a, b=b, weight=weight)
    if float64 or result_dtype(a, b, weight) == torch.float64:
        return reference.gram(a, b, weight, float64)
    h = torch.zeros(shape.in_a + 1, shape.in_b + 1, device=a.device, dtype=torch.float32)
    if shape.n == 0:
        return h
    fill(shape, a, b, weight, h)
    return with_float64_rescue(h, lambda: reference.gram(a, b, weight))
