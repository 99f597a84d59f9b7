"""The ECP sums by the library's matrix products (cuBLAS on CUDA): the ops' contract, unfused.

A second accelerator backend beside the fused Triton kernels (``ecp_fast.ops.triton``), with the
same numerics: per chunk of samples it forms the operands that the Triton kernel forms in registers
(the sensitivities ``c`` transposed, the shifted inputs ``x'`` and their squares, rounded to bf16
for half-precision layers; float32 otherwise, on TF32 tensor cores only where torch allows TF32) and
hands them to ``torch.mm`` writing float32 sums as float32 (``out_dtype``: cuBLAS on CUDA; on other
devices the same exact products in float32). The epilogue is the kernel's. It holds one chunk's
operands, at most about :data:`CHUNK_BYTES`, beside the outputs.

On an H200 plain bf16 GEMMs ran the same sums twice as fast as the fused kernel (docs/gpu.md); this
backend keeps the fused kernel's float32 sums, which plain half GEMMs round to the input dtype.
It is the ops' CUDA backend where triton is missing, or when selected
(:func:`ecp_fast.ops.use_cuda_backend`, ``ECP_FAST_CUDA_BACKEND=gemm``); not the default until
``bench/triton_table.py`` has measured it against the fused kernels on a GPU (the ``GEMM f32-out`` column).
"""

from __future__ import annotations

import logging

import torch

from ecp_fast.ops import _entry
from ecp_fast.ops._checks import GramShape, LayerShape
from ecp_fast.ops._entry import HALF_DTYPES

__all__ = ["CHUNK_BYTES", "SHIFT_ROWS", "gram", "moments", "score"]

logger = logging.getLogger(__name__)

#: Bytes of one chunk's operands (float32 inputs, their squares, sensitivities, their transposes).
CHUNK_BYTES = 256 << 20
#: The per-column shift is the mean of this many first samples: the rule of the CPU and Triton kernels.
SHIFT_ROWS = 256


#: Whether ``torch.mm(..., out_dtype=torch.float32)`` works here: None until tried (torch has it on CUDA
#: only, and only in recent versions), then what the first try found.
_out_dtype_works: bool | None = None


def _use_out_dtype(a: torch.Tensor) -> bool:
    return a.is_cuda and _out_dtype_works is not False


def _add_mm_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with float32 sums, in place: float32 operands (and upcast half ones: half
    products are exact in float32, and in TF32) accumulate inside the GEMM, with no ``(out, in)``
    temporary per chunk; half operands go through cuBLAS's ``out_dtype`` GEMM where torch has it."""
    global _out_dtype_works
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _use_out_dtype(a):
        try:
            result = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError) as error:  # a torch without it (before 2.8), or no kernel here
            _out_dtype_works = False
            logger.warning("torch.mm(out_dtype=float32) is not available (%s): half GEMMs run in float32", error)
        else:
            _out_dtype_works = True
            acc += result
            return
    acc.addmm_(a.float(), b.float())


def _chunk_rows(n: int, bytes_per_row: int) -> int:
    """Samples per chunk so that a chunk's operands stay within :data:`CHUNK_BYTES`."""
    return max(1, min(n, CHUNK_BYTES // max(bytes_per_row, 1)))


def _chunk_sensitivity(g: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``c = sum_p g_p^2`` of samples ``start:stop``, ``(rows, out)`` float32."""
    if g.dim() == 2:
        return g[start:stop].float().square()
    return g[:, start:stop].float().square().sum(dim=0)


def _sums(
    shape: LayerShape, x: torch.Tensor, g: torch.Tensor, compensate: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``s0``, the shift, ``S1 = c^T x'`` (None without ``compensate``) and ``S2 = c^T x'^2``, float32."""
    samples = x.reshape(shape.n, shape.fan_in)
    dtype = torch.bfloat16 if x.dtype in HALF_DTYPES and g.dtype in HALF_DTYPES else torch.float32
    shift = samples[:SHIFT_ROWS].float().mean(dim=0) if compensate else None
    s0 = torch.zeros(shape.fan_out, device=x.device, dtype=torch.float32)
    s1 = torch.zeros(shape.fan_out, shape.fan_in, device=x.device, dtype=torch.float32) if compensate else None
    s2 = torch.zeros(shape.fan_out, shape.fan_in, device=x.device, dtype=torch.float32)
    rows = _chunk_rows(shape.n, 4 * (3 * shape.fan_in + (shape.p + 2) * shape.fan_out))
    for start in range(0, shape.n, rows):
        c = _chunk_sensitivity(g, start, start + rows)
        s0 += c.sum(dim=0)
        centred = samples[start : start + rows].float()  # float32 inputs: the caller's tensor itself
        if shift is not None:
            centred = centred - shift
        c_t = c.t().to(dtype)
        _add_mm_float32(s2, c_t, centred.square().to(dtype))
        if s1 is not None:
            _add_mm_float32(s1, c_t, centred.to(dtype))
    return s0, shift, s1, s2


def _fill_layer(
    op: str,
    shape: LayerShape,
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    compensate: bool,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """The sums, then the Triton kernel's epilogue: closed forms, dead rows (``s0 <= 0``) exactly 0,
    ``m2`` clamped at 0 (a NaN kept), and for scores the weights."""
    s0_out, first, second = outputs
    s0, shift, s1, s2 = _sums(shape, x, g, compensate)
    dead = (s0 <= 0.0).unsqueeze(1)
    if weight is not None and not compensate:
        first.copy_(torch.where(dead, 0.0, weight.float().square() * s2))
        return
    assert shift is not None and s1 is not None
    offset = s1 / torch.where(s0 <= 0.0, 1.0, s0).unsqueeze(1)  # mean - shift
    mean = torch.where(dead, 0.0, shift + offset)
    m2 = s2 - s1 * offset
    m2 = torch.where(dead | (m2 < 0.0), 0.0, m2)
    if weight is None:
        s0_out.copy_(s0)
        first.copy_(mean)
        second.copy_(m2)
        return
    w = weight.float()
    first.copy_(torch.where(dead, 0.0, w.square() * m2))
    second.copy_(torch.where(dead, 0.0, w * mean))


def _augmented(t: torch.Tensor) -> torch.Tensor:
    """``[t, 1]``: the constant input of the bias, last, in ``t``'s dtype (1 is exact in every one)."""
    return torch.cat([t, torch.ones(t.shape[0], 1, device=t.device, dtype=t.dtype)], dim=1)


def _add_gram_chunk(h: torch.Tensor, left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor | None) -> None:
    """``h += sum_s w_s left_s right_s^T`` over one chunk of augmented rows, float32 sums: half operands
    without weights as they are, weighted bf16 as the Triton kernel's hi/lo split, anything else in float32."""
    same_half = left.dtype in HALF_DTYPES and right.dtype == left.dtype
    if same_half and weight is None:
        _add_mm_float32(h, left.t(), right)
        return
    scaled = left.float() if weight is None else left.float() * weight.float().unsqueeze(1)
    if same_half and left.dtype == torch.bfloat16:
        hi = scaled.to(torch.bfloat16)
        lo = (scaled - hi.float()).to(torch.bfloat16)  # hi + lo keep 16 bits of w_s a_s
        _add_mm_float32(h, hi.t(), right)
        _add_mm_float32(h, lo.t(), right)
        return
    h.addmm_(scaled.t(), right.float())


def _fill_gram(
    shape: GramShape, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor | None, h: torch.Tensor
) -> None:
    """Add ``H`` into ``h`` chunk by chunk (each chunk's augmented operands within :data:`CHUNK_BYTES`)."""
    left_rows = a.reshape(shape.n, shape.in_a)
    right_rows = None if b is None else b.reshape(shape.n, shape.in_b)
    rows = _chunk_rows(shape.n, 4 * 3 * (shape.in_a + shape.in_b + 2))
    for start in range(0, shape.n, rows):
        left = _augmented(left_rows[start : start + rows])
        right = left if right_rows is None else _augmented(right_rows[start : start + rows])
        _add_gram_chunk(h, left, right, None if weight is None else weight[start : start + rows])


def moments(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s0, mean, m2)`` as :func:`ecp_fast.ops.reference.moments`, by float32-output GEMMs."""
    return _entry.moments(x, g, _fill_layer)


def score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance, bias_delta)`` as :func:`ecp_fast.ops.reference.score`, by float32-output GEMMs."""
    return _entry.score(x, g, weight, compensate, _fill_layer)


def gram(
    a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None, float64: bool = False
) -> torch.Tensor:
    """``H = sum_s w_s [a_s; 1] [b_s; 1]^T`` as :func:`ecp_fast.ops.reference.gram`, by float32-output GEMMs."""
    return _entry.gram(a, b, weight, float64, _fill_gram)
