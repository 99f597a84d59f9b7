"""The Triton kernels behind ``ecp::moments``, ``ecp::score`` and ``ecp::gram`` on CUDA tensors.

The kernel bodies are plain functions here; :func:`build_kernels` turns them into ``@triton.jit``
kernels (autotuned on a GPU, a single small configuration under ``TRITON_INTERPRET=1``). Decorating
lazily means the interpreter setting is read when the kernels are first launched, not when this
module is imported, so importing ``ecp_fast`` before setting ``TRITON_INTERPRET`` is harmless.

Design (see docs/gpu.md): one program owns a ``(BLOCK_OUT x BLOCK_IN)`` tile of weights and streams
the samples in ``BLOCK_N`` chunks. Per chunk it squares and sums the ``P`` gradient slices into the
sensitivity ``c^T`` ``(BLOCK_OUT x BLOCK_N)`` in registers, loads the activations, subtracts the
per-column shift, and accumulates ``c^T x'`` and ``c^T x'^2`` with two ``tl.dot`` calls into float32
accumulators, plus ``s0 = sum c``. The epilogue turns the three sums into the outputs in registers.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl

# Rows of x averaged by the shift pre-pass (the CPU kernel uses the same number).
SHIFT_ROWS = 256
# Up to this many gradient slices are squared inside the kernel (unrolled); beyond it the launcher
# reduces them to the sensitivity first. Each slice is a pipelined load with its own shared-memory
# buffers per stage, so more would push the larger tiles past Ampere's shared memory.
MAX_UNROLLED_PROBES = 4


def _column_shift(
    x_ptr,
    shift_ptr,
    n_rows,
    fan_in,
    stride_xn,
    stride_xi,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``shift[j] = mean of x[:n_rows, j]`` in float32: the same shift for every tile."""
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_IN + tl.arange(0, BLOCK_IN)
    mask_i = offs_i < fan_in
    total = tl.zeros((BLOCK_IN,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & mask_i[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xn + offs_i[None, :] * stride_xi
        total += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), axis=0)
    tl.store(shift_ptr + offs_i, total / n_rows, mask=mask_i)


def _weighted_moments(
    x_ptr,
    g_ptr,
    w_ptr,
    shift_ptr,
    s0_ptr,
    first_ptr,
    second_ptr,
    n_samples,
    fan_in,
    fan_out,
    stride_xn,
    stride_xi,
    stride_gp,
    stride_gn,
    stride_go,
    stride_wo,
    stride_wi,
    n_bucket,
    N_PROBES: tl.constexpr,
    G_IS_SENSITIVITY: tl.constexpr,
    SCORE: tl.constexpr,
    COMPENSATE: tl.constexpr,
    DOT_BF16: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_OUT: tl.constexpr,
):
    """Moments (``SCORE=False``: s0, mean, m2) or scores (importance, bias_delta) of one tile.

    ``first_ptr``/``second_ptr`` receive ``mean``/``m2`` or ``importance``/``bias_delta``;
    ``n_bucket`` only keys the autotuner. Without ``COMPENSATE`` the shift is not used and only
    ``sum c x^2`` is accumulated (one dot per chunk).
    """
    # Grouped tile order: consecutive programs share gradient rows, which keeps them in L2.
    pid = tl.program_id(0)
    tiles_out = tl.cdiv(fan_out, BLOCK_OUT)
    tiles_in = tl.cdiv(fan_in, BLOCK_IN)
    per_group = GROUP_OUT * tiles_in
    group = pid // per_group
    first_out = group * GROUP_OUT
    group_size = tl.minimum(tiles_out - first_out, GROUP_OUT)
    pid_out = first_out + (pid % per_group) % group_size
    pid_in = (pid % per_group) // group_size

    offs_o = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_i = pid_in * BLOCK_IN + tl.arange(0, BLOCK_IN)
    mask_o = offs_o < fan_out
    mask_i = offs_i < fan_in
    if COMPENSATE:
        shift = tl.load(shift_ptr + offs_i, mask=mask_i, other=0.0)

    sum_first = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    sum_second = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    s0 = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    # In-tile offsets stay int32 (the launcher guarantees they fit); the pointers themselves advance
    # by one chunk per iteration in 64-bit arithmetic, so N * stride may exceed 2^31.
    chunk = tl.arange(0, BLOCK_N)
    g_chunk = g_ptr + offs_o[:, None] * stride_go + chunk[None, :] * stride_gn
    x_chunk = x_ptr + chunk[:, None] * stride_xn + offs_i[None, :] * stride_xi
    for start in range(0, n_samples, BLOCK_N):
        mask_n = (start + chunk) < n_samples

        # Sensitivity, transposed: c_t[o, n] = sum_p g[p, n, o]^2; masked entries are 0.
        g_mask = mask_o[:, None] & mask_n[None, :]
        g_ptrs = g_chunk
        c_t = tl.zeros((BLOCK_OUT, BLOCK_N), dtype=tl.float32)
        for _ in tl.static_range(N_PROBES):
            g_p = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            if G_IS_SENSITIVITY:
                c_t += g_p
            else:
                c_t += g_p * g_p
            g_ptrs += stride_gp
        s0 += tl.sum(c_t, axis=1)

        a = tl.load(x_chunk, mask=mask_n[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        if COMPENSATE:
            a = a - shift[None, :]
        g_chunk += BLOCK_N * stride_gn
        x_chunk += BLOCK_N * stride_xn
        a_sq = a * a

        if DOT_BF16:
            # bf16 keeps float32's exponent range: c can be ~1e-12 and x'^2 ~1e6 without under/overflow
            c_op = c_t.to(tl.bfloat16)
            a_op = a.to(tl.bfloat16)
            a_sq_op = a_sq.to(tl.bfloat16)
            if UPCAST_DOT:
                # The interpreter multiplies bf16 bit patterns as integers; same rounding, fp32 product.
                c_op = c_op.to(tl.float32)
                a_op = a_op.to(tl.float32)
                a_sq_op = a_sq_op.to(tl.float32)
        else:
            c_op = c_t
            a_op = a
            a_sq_op = a_sq
        sum_second = tl.dot(c_op, a_sq_op, sum_second, input_precision=INPUT_PRECISION)
        if COMPENSATE:
            sum_first = tl.dot(c_op, a_op, sum_first, input_precision=INPUT_PRECISION)

    # Epilogue, in registers: docs/method.md's closed forms with the shift undone. A row is dead only when
    # s0 <= 0; a NaN s0 (NaN gradients) is not, and its NaN reaches every output of the row.
    dead = (s0 <= 0.0)[:, None]
    safe_s0 = tl.where(s0 <= 0.0, 1.0, s0)
    out_mask = mask_o[:, None] & mask_i[None, :]
    out_offsets = offs_o.to(tl.int64)[:, None] * fan_in + offs_i[None, :]
    if COMPENSATE:
        offset = sum_first / safe_s0[:, None]  # mean - shift
        mean = tl.where(dead, 0.0, shift[None, :] + offset)
        m2 = sum_second - sum_first * offset
        # Clamp rounding below zero; where(m2 < 0) keeps a NaN, which tl.maximum would drop on a GPU.
        m2 = tl.where(dead | (m2 < 0.0), 0.0, m2)
    if SCORE:
        w_ptrs = w_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
        w = tl.load(w_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        if COMPENSATE:
            # where(dead) again: a dead row's zeros must not become NaN through a NaN weight.
            tl.store(first_ptr + out_offsets, tl.where(dead, 0.0, w * w * m2), mask=out_mask)
            tl.store(second_ptr + out_offsets, tl.where(dead, 0.0, w * mean), mask=out_mask)
        else:
            tl.store(first_ptr + out_offsets, tl.where(dead, 0.0, w * w * sum_second), mask=out_mask)
    else:
        tl.store(first_ptr + out_offsets, mean, mask=out_mask)
        tl.store(second_ptr + out_offsets, m2, mask=out_mask)
        # One column of tiles writes s0, so each row is written exactly once.
        if pid_in == 0:
            tl.store(s0_ptr + offs_o, s0, mask=mask_o)


def _gram(
    a_ptr,
    b_ptr,
    w_ptr,
    h_ptr,
    n_samples,
    in_a,
    in_b,
    stride_an,
    stride_ai,
    stride_bn,
    stride_bi,
    stride_w,
    n_bucket,
    HAS_WEIGHT: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_A: tl.constexpr,
):
    """One ``(BLOCK_A x BLOCK_B)`` tile of ``H = sum_s w_s [a_s; 1] [b_s; 1]^T``, float32 accumulation.

    Column ``in_a`` of the augmented ``a`` (row ``in_a`` of ``H``) is the constant 1, and likewise for
    ``b``: the tiles that reach it load ones there, so the sums and the total weight come out of the
    same ``tl.dot``. ``DOT_NATIVE`` runs the dot on the (half) input dtype, whose products are exact
    in float32: as is without weights, and for bf16 with weights as two dots of a hi/lo split of the
    weighted ``a`` (the tensor cores' rate instead of float32 FMAs, 16 bits of each product kept).
    ``n_bucket`` only keys the autotuner.
    """
    pid = tl.program_id(0)
    tiles_a = tl.cdiv(in_a + 1, BLOCK_A)
    tiles_b = tl.cdiv(in_b + 1, BLOCK_B)
    per_group = GROUP_A * tiles_b
    first_a = (pid // per_group) * GROUP_A
    group_size = tl.minimum(tiles_a - first_a, GROUP_A)
    pid_a = first_a + (pid % per_group) % group_size
    pid_b = (pid % per_group) // group_size

    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ones_a = (offs_a == in_a)[None, :]
    ones_b = (offs_b == in_b)[None, :]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for start in range(0, n_samples, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask_n = (rows < n_samples)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        a_ptrs = a_ptr + rows64 * stride_an + offs_a.to(tl.int64)[None, :] * stride_ai
        a = tl.load(a_ptrs, mask=mask_n & (offs_a < in_a)[None, :], other=0.0)
        b_ptrs = b_ptr + rows64 * stride_bn + offs_b.to(tl.int64)[None, :] * stride_bi
        b = tl.load(b_ptrs, mask=mask_n & (offs_b < in_b)[None, :], other=0.0)
        if DOT_NATIVE and HAS_WEIGHT:
            # bf16 operands on tensor cores: w_s a_s is split into hi + lo, two bf16 values whose sum
            # keeps 16 of its bits (float32 keeps 24); bf16 b is exact, the products exact in float32.
            w = tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=rows < n_samples, other=0.0)
            scaled = tl.where(ones_a & mask_n, 1.0, a.to(tl.float32)) * w.to(tl.float32)[:, None]
            hi = scaled.to(a.dtype)
            lo = (scaled - hi.to(tl.float32)).to(a.dtype)
            b = tl.where(ones_b & mask_n, 1.0, b).to(b.dtype)
            if UPCAST_DOT:  # the interpreter's numpy dot cannot multiply bf16: the same values in float32
                hi, lo, b = hi.to(tl.float32), lo.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(hi), b, acc, input_precision=INPUT_PRECISION)
            a = lo  # the second dot below adds lo^T b
        elif DOT_NATIVE and not UPCAST_DOT:
            a = tl.where(ones_a & mask_n, 1.0, a).to(a.dtype)
            b = tl.where(ones_b & mask_n, 1.0, b).to(b.dtype)
        else:
            a = tl.where(ones_a & mask_n, 1.0, a.to(tl.float32))
            b = tl.where(ones_b & mask_n, 1.0, b.to(tl.float32))
            if HAS_WEIGHT:
                w = tl.load(w_ptr + rows.to(tl.int64) * stride_w, mask=rows < n_samples, other=0.0)
                a = a * w.to(tl.float32)[:, None]
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

    out_mask = (offs_a < in_a + 1)[:, None] & (offs_b < in_b + 1)[None, :]
    out_offsets = offs_a.to(tl.int64)[:, None] * (in_b + 1) + offs_b[None, :]
    tl.store(h_ptr + out_offsets, acc, mask=out_mask)


def _config(block_out: int, block_in: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_OUT": block_out, "BLOCK_IN": block_in, "BLOCK_N": block_n, "GROUP_OUT": 8},
        num_warps=warps,
        num_stages=stages,
    )


# Fits every case on Ampere and Hopper (at most ~100 KB of shared memory for float32 with 4 probes,
# no register spills when compiled for sm_80 and sm_90): the autotuner always has a valid choice,
# and it is the configuration used when autotuning is off.
SAFE_CONFIG = _config(64, 64, 32, 4, 3)

# Hopper (H100/H200, 228 KB shared memory, wgmma) and Ampere (A100, 164 KB) tiles. Two float32
# (128 x 128) accumulators need 8 warps to stay in registers; the smaller tiles fill the GPU for
# layers with few tiles (MLP-sized). Configurations that do not fit a device fail to compile and
# the autotuner skips them.
AUTOTUNE_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 32, 8, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 32, 4, 5),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 5),
    _config(32, 64, 64, 4, 4),
    _config(32, 32, 64, 2, 4),
    SAFE_CONFIG,
]
AUTOTUNE_KEY = [
    "fan_out",
    "fan_in",
    "n_bucket",
    "N_PROBES",
    "G_IS_SENSITIVITY",
    "SCORE",
    "COMPENSATE",
    "DOT_BF16",
    "INPUT_PRECISION",
]

# Small tiles in the interpreter: every program runs in numpy, and small blocks still exercise the
# masked tails of every dimension.
INTERPRETER_BLOCKS = {"BLOCK_OUT": 16, "BLOCK_IN": 16, "BLOCK_N": 32, "GROUP_OUT": 2}
INTERPRETER_SHIFT_BLOCKS = {"BLOCK_ROWS": 64, "BLOCK_IN": 32}
SHIFT_BLOCKS = {"BLOCK_ROWS": 32, "BLOCK_IN": 128}


# The configuration used when autotuning is switched off (``ECP_FAST_TRITON_AUTOTUNE=0``).
DEFAULT_CONFIG = SAFE_CONFIG


def _gram_config(block_a: int, block_b: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_A": block_a, "BLOCK_B": block_b, "BLOCK_N": block_n, "GROUP_A": 8},
        num_warps=warps,
        num_stages=stages,
    )


# One float32 accumulator per tile (half the registers of the moments kernel's two), so larger tiles
# fit; the small ones fill the GPU for MLP-sized layers, whose Grams have few tiles.
GRAM_SAFE_CONFIG = _gram_config(64, 64, 32, 4, 3)
GRAM_AUTOTUNE_CONFIGS = [
    _gram_config(128, 128, 32, 8, 3),
    _gram_config(128, 128, 64, 8, 3),
    _gram_config(128, 64, 32, 4, 4),
    _gram_config(64, 128, 32, 4, 4),
    _gram_config(64, 64, 64, 4, 4),
    _gram_config(32, 64, 64, 4, 4),
    GRAM_SAFE_CONFIG,
]
GRAM_AUTOTUNE_KEY = ["in_a", "in_b", "n_bucket", "HAS_WEIGHT", "DOT_NATIVE", "INPUT_PRECISION"]
INTERPRETER_GRAM_BLOCKS = {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_N": 32, "GROUP_A": 2}


@functools.lru_cache(maxsize=4)
def build_kernels(interpret: bool, autotune: bool = True) -> SimpleNamespace:
    """The jitted kernels for the current ``TRITON_INTERPRET`` setting (cached per setting).

    ``weighted_moments`` is autotuned over :data:`AUTOTUNE_CONFIGS` on a GPU (or fixed to
    :data:`DEFAULT_CONFIG` when ``autotune`` is False); under the interpreter it is the bare kernel
    and the launcher passes :data:`INTERPRETER_BLOCKS`.
    """
    del interpret  # only the cache key: triton.jit reads the setting itself
    column_shift = triton.jit(_column_shift)
    weighted_moments = triton.jit(_weighted_moments)
    gram = triton.jit(_gram)
    if not triton.knobs.runtime.interpret:
        configs = AUTOTUNE_CONFIGS if autotune else [DEFAULT_CONFIG]
        weighted_moments = triton.autotune(configs=configs, key=AUTOTUNE_KEY)(weighted_moments)
        gram_configs = GRAM_AUTOTUNE_CONFIGS if autotune else [GRAM_SAFE_CONFIG]
        gram = triton.autotune(configs=gram_configs, key=GRAM_AUTOTUNE_KEY)(gram)
    return SimpleNamespace(column_shift=column_shift, weighted_moments=weighted_moments, gram=gram)
