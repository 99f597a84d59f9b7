"""Throughput table of the fused Triton ops ``ecp::score``, ``ecp::moments`` and ``ecp::gram`` against cuBLAS.

Run on a CUDA machine: ``python bench/triton_table.py`` (``make bench-gpu``). Prints a markdown
table of TFLOP/s for each op, shape and dtype, with these contenders:

* the fused Triton kernel through ``torch.ops.ecp.<op>`` (autotuned first);
* ``cuBLAS``: ``torch.mm`` on the GEMMs the op needs, in the input dtype, operands prepared
  beforehand (the ceiling for a kernel that does these GEMMs plus extra work): for ``score`` and
  ``moments`` the two GEMMs ``c^T x'`` and ``c^T x'^2`` (``4 * N * in * out`` FLOPs), for ``gram``
  the one GEMM ``x^T x`` (``2 * N * in^2`` FLOPs);
* ``torch formula``: the same computation written in plain PyTorch in the input dtype
  (:func:`unfused_score`, :func:`unfused_moments`, :func:`unfused_gram`), which materialises the
  ``(N, in)`` temporaries; the fair unfused GPU baseline;
* ``GEMM f32-out``: ``ecp_fast.ops.gemm``, the ops by GEMMs that write their float32 sums as float32
  (cuBLAS's ``out_dtype`` GEMM for half operands): the fused kernel's precision at, perhaps, cuBLAS's
  speed; the candidate second CUDA backend;
* ``reference f64``: ``ecp_fast.ops.reference.<op>`` as shipped (float64 throughout).

``err`` columns: ``||got - exact|| / ||exact||`` of the op's main output (importance, m2, H) against
the float64 reference on float64 copies of the same inputs, for the fused op, the torch formula
(whose half-precision GEMMs round their sums to the input dtype) and the float32-output GEMMs.

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

SHAPES = [(16384, 4096, 4096), (65536, 4096, 11008), (16384, 784, 300)]
OPS = ("score", "moments", "gram")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def score_flops(n: int, fan_in: int, fan_out: int) -> float:
    """FLOPs credited to one score call: two ``(out x N) @ (N x in)`` GEMMs."""
    return 4.0 * n * fan_in * fan_out


def _sums(x: torch.Tensor, g: torch.Tensor, shift_rows: int = 256) -> tuple[torch.Tensor, ...]:
    """``s0``, the shift, ``s1 = c^T x'`` and ``s2 = c^T x'^2`` as the kernel forms them: shift by the mean
    of the first ``shift_rows`` samples, ``c`` and ``x'`` in float32 then rounded to the input dtype."""
    c = g.float().square()
    s0 = c.sum(dim=0)
    shift = x[:shift_rows].float().mean(dim=0)
    centred = x.float() - shift
    c_t = c.t().to(x.dtype)
    # torch.mm in the input dtype rounds the sums to it (bf16: 8 bits) before m2 = S2 - S1^2 / s0 cancels them
    return s0, shift, torch.mm(c_t, centred.to(x.dtype)).float(), torch.mm(c_t, centred.square().to(x.dtype)).float()


def _closed_forms(
    s0: torch.Tensor, shift: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``(active rows, mean, m2)`` from the sums (rows with ``s0 = 0`` are inactive)."""
    safe_s0 = torch.where(s0 > 0, s0, torch.ones_like(s0)).unsqueeze(1)
    offset = s1 / safe_s0
    return (s0 > 0).unsqueeze(1), shift + offset, (s2 - s1 * offset).clamp_min(0.0)


def unfused_score(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ECP importance and bias shift in plain PyTorch, the GEMMs by ``torch.mm`` in the input dtype; the
    kernel's formula."""
    active, mean, m2 = _closed_forms(*_sums(x, g))
    w = weight.float()
    return torch.where(active, w.square() * m2, 0.0), torch.where(active, w * mean, 0.0)


def unfused_moments(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(s0, mean, m2)`` in plain PyTorch; the formula of :func:`unfused_score`."""
    s0, shift, s1, s2 = _sums(x, g)
    active, mean, m2 = _closed_forms(s0, shift, s1, s2)
    return s0, torch.where(active, mean, 0.0), torch.where(active, m2, 0.0)


def unfused_gram(x: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
    """``sum_s w_s [x_s; 1][x_s; 1]^T`` in plain PyTorch: augment, scale, one GEMM in the input dtype."""
    augmented = torch.cat([x, torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)], dim=1)
    return torch.mm((augmented * sample_weight.unsqueeze(1)).t(), augmented).float()


def time_ms(fn) -> float:
    """Median milliseconds of ``fn`` (warm-up and L2 flush by ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_layer(dtype: torch.dtype, n: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, ...]:
    """ReLU-like activations, small gradients, weights and per-sample weights on the GPU (fresh each call)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, fan_in, device="cuda", generator=generator).relu_().to(dtype)
    g = (torch.randn(n, fan_out, device="cuda", generator=generator) * 1e-2).to(dtype)
    weight = torch.randn(fan_out, fan_in, device="cuda", generator=generator).to(dtype)
    sample_weight = torch.rand(n, device="cuda", generator=generator).to(dtype)
    return x, g, weight, sample_weight


def two_gemms(x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """cuBLAS on the two GEMMs of ``score`` / ``moments``, operands prepared outside the timing."""
    c_t = g.float().square().t().to(x.dtype)
    x_sq = x.square()
    first = torch.empty(c_t.shape[0], x.shape[1], device="cuda", dtype=x.dtype)
    second = torch.empty_like(first)

    def cublas() -> None:
        torch.mm(c_t, x, out=first)
        torch.mm(c_t, x_sq, out=second)

    return cublas


def one_gemm(x: torch.Tensor) -> Callable[[], None]:
    """cuBLAS on the one GEMM of ``gram``, ``x^T x``, into a preallocated output."""
    out = torch.empty(x.shape[1], x.shape[1], device="cuda", dtype=x.dtype)
    return lambda: torch.mm(x.t(), x, out=out)


def contenders(op: str, layer: tuple[torch.Tensor, ...]) -> tuple[dict[str, Callable[[], object]], float]:
    """The calls timed for ``op`` (fused first) and the FLOPs credited to one call."""
    from ecp_fast import ops
    from ecp_fast.ops import gemm, reference

    x, g, weight, sample_weight = layer
    n, fan_in, fan_out = x.shape[0], x.shape[1], g.shape[-1]
    if op == "gram":
        calls = {
            "fused": lambda: ops.gram(x, None, sample_weight),
            "cuBLAS": one_gemm(x),
            "torch formula": lambda: unfused_gram(x, sample_weight),
            "GEMM f32-out": lambda: gemm.gram(x, None, sample_weight),
            "reference f64": lambda: reference.gram(x, None, sample_weight, True),
        }
        return calls, 2.0 * n * fan_in * fan_in
    if op == "score":
        calls = {
            "fused": lambda: ops.score(x, g, weight),
            "cuBLAS": two_gemms(x, g),
            "torch formula": lambda: unfused_score(x, g, weight),
            "GEMM f32-out": lambda: gemm.score(x, g, weight),
            "reference f64": lambda: reference.score(x, g, weight),
        }
    else:
        calls = {
            "fused": lambda: ops.moments(x, g),
            "cuBLAS": two_gemms(x, g),
            "torch formula": lambda: unfused_moments(x, g),
            "GEMM f32-out": lambda: gemm.moments(x, g),
            "reference f64": lambda: reference.moments(x, g),
        }
    return calls, score_flops(n, fan_in, fan_out)


def main_output(op: str, result: Any) -> torch.Tensor:
    """The output an op's error is measured on: the importance, ``m2`` or ``H``."""
    return result if op == "gram" else result[0] if op == "score" else result[2]


def exact_output(op: str, layer: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The float64 reference's main output on float64 copies of the inputs."""
    from ecp_fast.ops import reference

    x, g, weight, sample_weight = (t.double() for t in layer)
    if op == "gram":
        return reference.gram(x, None, sample_weight)
    return main_output(op, reference.score(x, g, weight) if op == "score" else reference.moments(x, g))


#: The contenders whose relative error against the float64 reference is printed.
ERROR_COLUMNS = ("fused", "torch formula", "GEMM f32-out")


def measure(op: str, dtype: torch.dtype, shape: tuple[int, int, int], with_f64: bool) -> dict[str, Any]:
    """Milliseconds of each contender and the relative errors of :data:`ERROR_COLUMNS`; ``None`` where a
    contender ran out of memory or is not available here (the reason goes to stderr)."""
    layer = make_layer(dtype, *shape)
    calls, flops = contenders(op, layer)
    results: dict[str, Any] = {"flops": flops}
    calls["fused"]()  # autotune outside the timed region
    for name, fn in calls.items():
        results[name] = None
        if name == "reference f64" and not with_f64:
            continue
        try:
            results[name] = time_ms(fn)
        except (torch.OutOfMemoryError, RuntimeError, TypeError) as error:
            print(f"{op} {name}: not timed: {str(error).splitlines()[0]}", file=sys.stderr)
        torch.cuda.empty_cache()
    exact = exact_output(op, layer)
    for name in ERROR_COLUMNS:
        results[f"{name} err"] = None
        if results[name] is not None:
            got = main_output(op, calls[name]()).double()
            results[f"{name} err"] = float((got - exact).norm() / exact.norm())
    torch.cuda.empty_cache()
    return results


def tflops(flops: float, ms: float | None) -> str:
    return "-" if ms is None else f"{flops / (ms * 1e-3) / 1e12:.1f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def row(op: str, label: str, shape: tuple[int, int, int], ms: dict[str, Any]) -> str:
    """One markdown row: TFLOP/s of each contender, the fused op's share of cuBLAS, speed-ups and errors."""
    flops = float(ms["flops"] or 0.0)
    fused, cublas = ms["fused"], ms["cuBLAS"]
    share = "-" if fused is None or cublas is None else f"{100.0 * cublas / fused:.0f}%"
    n, fan_in, fan_out = shape
    errors = " | ".join(error(ms[f"{name} err"]) for name in ERROR_COLUMNS)
    return (
        f"| {op} | {label} | {n} | {fan_in} | {'-' if op == 'gram' else fan_out} | {tflops(flops, fused)} | "
        f"{tflops(flops, cublas)} | {share} | {tflops(flops, ms['torch formula'])} | "
        f"{tflops(flops, ms['GEMM f32-out'])} | {tflops(flops, ms['reference f64'])} | "
        f"{ratio(ms['torch formula'], fused)} | {ratio(ms['reference f64'], fused)} | {errors} |"
    )


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"N,in,out"`` -> ``(N, in, out)``."""
    try:
        n, fan_in, fan_out = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is 'N,in,out' with three integers, got {text!r}") from None
    return n, fan_in, fan_out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES, help="'N,in,out' each")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 (kernel and cuBLAS alike)")
    parser.add_argument("--skip-f64", action="store_true", help="do not time the float64 reference")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 0 without CUDA."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_table: no CUDA device; the GPU benchmark needs one. Nothing measured.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    fp32_mode = "tf32" if args.tf32 else "ieee"
    print(f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; TFLOP/s (higher is better)")
    print()
    print(
        "| op | dtype | N | in | out | fused | cuBLAS | % of cuBLAS | torch formula | GEMM f32-out | reference f64 | "
        "x torch formula | x reference f64 | err fused | err formula | err GEMM |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        label = dtype_name if dtype is not torch.float32 else f"fp32 ({fp32_mode})"
        for shape in args.shapes:
            for op in args.ops:
                print(row(op, label, shape, measure(op, dtype, shape, with_f64=not args.skip_f64)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
