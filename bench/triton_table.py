"""Throughput table of the fused Triton ``ecp::score`` against cuBLAS and two unfused references.

Run on a CUDA machine: ``python bench/triton_table.py`` (``make bench-gpu``). Prints a markdown
table of TFLOP/s, counting ``4 * N * in * out`` FLOPs per call (the two GEMMs ``(out x N) @ (N x in)``
that the score needs: ``c^T x'`` and ``c^T x'^2``), for:

* ``ecp::score``: the fused Triton kernel through ``torch.ops.ecp.score`` (autotuned first);
* ``cuBLAS 2 x mm``: ``torch.mm`` on the same two GEMMs in the input dtype, operands prepared
  beforehand (the ceiling for a kernel that does the GEMMs plus extra work);
* ``torch formula``: the same computation written in plain PyTorch in the input dtype
  (:func:`unfused_score`: shift, square, two ``torch.mm``, elementwise epilogue), which
  materialises the ``(N, in)`` temporaries; the fair unfused GPU baseline;
* ``reference f64``: ``ecp_fast.ops.reference.score`` as shipped (float64 throughout).

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = [(16384, 4096, 4096), (65536, 4096, 11008), (16384, 784, 300)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def score_flops(n: int, fan_in: int, fan_out: int) -> float:
    """FLOPs credited to one score call: two ``(out x N) @ (N x in)`` GEMMs."""
    return 4.0 * n * fan_in * fan_out


def unfused_score(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, shift_rows: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """ECP importance and bias shift in plain PyTorch, GEMMs in the input dtype (float32 accumulation).

    Same formula as the kernel: shift by the mean of the first ``shift_rows`` samples, ``s1 = c^T x'``,
    ``s2 = c^T x'^2``, then ``m2 = s2 - s1^2 / s0`` and ``mean = shift + s1 / s0``.
    """
    c = g.float().square()
    s0 = c.sum(dim=0)
    shift = x[:shift_rows].float().mean(dim=0)
    centred = (x.float() - shift).to(x.dtype)
    c_t = c.t().to(x.dtype)
    s1 = torch.mm(c_t, centred).float()
    s2 = torch.mm(c_t, centred.square()).float()
    active = (s0 > 0).unsqueeze(1)
    safe_s0 = torch.where(s0 > 0, s0, torch.ones_like(s0)).unsqueeze(1)
    offset = s1 / safe_s0
    w = weight.float()
    importance = torch.where(active, w.square() * (s2 - s1 * offset).clamp_min(0.0), 0.0)
    bias_delta = torch.where(active, w * (shift + offset), 0.0)
    return importance, bias_delta


def time_ms(fn) -> float:
    """Median milliseconds of ``fn`` (warm-up and L2 flush by ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure(dtype: torch.dtype, n: int, fan_in: int, fan_out: int, with_f64: bool) -> dict[str, float | None]:
    """Milliseconds of each contender for one shape; ``None`` where it ran out of memory."""
    import ecp_fast
    from ecp_fast.ops import reference

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, fan_in, device="cuda", generator=generator).relu_()).to(dtype)
    g = (torch.randn(n, fan_out, device="cuda", generator=generator) * 1e-2).to(dtype)
    weight = torch.randn(fan_out, fan_in, device="cuda", generator=generator).to(dtype)
    results: dict[str, float | None] = {}

    ecp_fast.score(x, g, weight)  # autotune outside the timed region
    results["ecp::score"] = time_ms(lambda: ecp_fast.score(x, g, weight))

    c_t = g.float().square().t().to(dtype)
    x_sq = x.square()
    first = torch.empty(fan_out, fan_in, device="cuda", dtype=dtype)
    second = torch.empty_like(first)

    def cublas() -> None:
        torch.mm(c_t, x, out=first)
        torch.mm(c_t, x_sq, out=second)

    results["cuBLAS 2 x mm"] = time_ms(cublas)

    for name, fn, enabled in (
        ("torch formula", lambda: unfused_score(x, g, weight), True),
        ("reference f64", lambda: reference.score(x, g, weight), with_f64),
    ):
        if not enabled:
            results[name] = None
            continue
        try:
            results[name] = time_ms(fn)
        except torch.OutOfMemoryError:
            results[name] = None
        torch.cuda.empty_cache()
    return results


def tflops(flops: float, ms: float | None) -> str:
    return "-" if ms is None else f"{flops / (ms * 1e-3) / 1e12:.1f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 0 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 (kernel and cuBLAS alike)")
    parser.add_argument("--skip-f64", action="store_true", help="do not time the float64 reference")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("triton_table: no CUDA device; the GPU benchmark needs one. Nothing measured.")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    fp32_mode = "tf32" if args.tf32 else "ieee"

    print(f"Device: {torch.cuda.get_device_name()}; FLOPs per call = 4 * N * in * out; TFLOP/s (higher is better)")
    print()
    print(
        "| dtype | N | in | out | ecp::score | cuBLAS 2 x mm | % of cuBLAS | torch formula | "
        "reference f64 | x torch formula | x reference f64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        label = dtype_name if dtype is not torch.float32 else f"fp32 ({fp32_mode})"
        for n, fan_in, fan_out in SHAPES:
            ms = measure(dtype, n, fan_in, fan_out, with_f64=not args.skip_f64)
            flops = score_flops(n, fan_in, fan_out)
            fused = ms["ecp::score"]
            share = "-" if fused is None else f"{100.0 * ms['cuBLAS 2 x mm'] / fused:.0f}%"
            print(
                f"| {label} | {n} | {fan_in} | {fan_out} | {tflops(flops, fused)} | "
                f"{tflops(flops, ms['cuBLAS 2 x mm'])} | {share} | {tflops(flops, ms['torch formula'])} | "
                f"{tflops(flops, ms['reference f64'])} | {ratio(ms['torch formula'], fused)} | "
                f"{ratio(ms['reference f64'], fused)} |",
                flush=True,
            )
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
