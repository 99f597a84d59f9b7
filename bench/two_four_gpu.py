"""Speed of 2:4 exports on a CUDA GPU: dense ``nn.Linear`` against the same layer exported by ``ecp_fast``.

Run on a CUDA GPU that runs semi-structured weights (compute capability 8.x, or later with cuSPARSELt):
``python bench/two_four_gpu.py``. For each dtype,
layer shape ``(out, in)`` and number of tokens, a one-layer model is pruned to 2:4 by
``ecp_fast.prune(method="magnitude", scope="2:4")`` and exported by
``ecp_fast.export.export(model, "2:4")`` (semi-structured sparse weights); the table gives the median
forward time of the dense layer, of the export with torch's default backend (cuSPARSELt where torch
has it), with CUTLASS forced, and with ``example_inputs=x`` (each layer converted only where 2:4 runs
faster on its input), their speed-ups, and the exports' largest relative error against the dense
forward of the same 2:4 weights. A last block times a LLaMA-7B-sized MLP (``4096 -> 11008 -> 4096``,
SiLU) end to end. On compute capability 9.0 and later the CUTLASS column stays empty: torch's CUTLASS
2:4 kernels run on 8.x only, and the export refuses it there. Timings are medians of ``triton.testing.do_bench``.

Without a suitable GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

import ecp_fast
from ecp_fast.export.semi_structured import semi_structured_available

LAYERS = [(11008, 4096), (4096, 11008), (4096, 4096)]
TOKENS = [1024, 4096, 16384]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (warm-up and L2 flush by ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def pruned(model: nn.Module) -> nn.Module:
    """``model`` pruned to 2:4 by magnitude (no data needed), masks still attached."""
    ecp_fast.prune(model, None, sparsity=0.5, method="magnitude", scope="2:4", progress=False)
    return model


def exported(model: nn.Module, cutlass: bool, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A 2:4 export of ``model``, with CUTLASS forced or torch's default semi-structured backend; with
    ``example_inputs``, only the layers that run faster as 2:4 on them are converted."""
    cls = torch.sparse.SparseSemiStructuredTensor
    previous = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = cutlass
    try:
        return ecp_fast.export.export(model, "2:4", example_inputs=example_inputs)
    finally:
        cls._FORCE_CUTLASS = previous


def compare(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Median ms of the dense (masked, folded) model and its two exports, and the exports' relative errors."""
    dense = ecp_fast.export.export(model, "dense")
    results: dict[str, float] = {}
    with torch.inference_mode():
        expected = dense(x).float()
        results["dense"] = time_ms(lambda: dense(x))
        for name, cutlass, example in (("default", False, None), ("cutlass", True, None), ("measured", False, x)):
            try:
                sparse = exported(model, cutlass, example)
                got = sparse(x).float()
            except (RuntimeError, ValueError) as error:  # a backend that refuses this GPU, shape or dtype
                print(f"  {name} backend refused: {str(error).splitlines()[0]}", file=sys.stderr)
                continue
            results[name] = time_ms(lambda sparse=sparse: sparse(x))
            results[f"{name} err"] = float((got - expected).norm() / expected.norm())
    return results


def cell(results: dict[str, float], name: str) -> str:
    if name not in results:
        return "- | -"
    return f"{results[name]:.3f} | {results['dense'] / results[name]:.2f}x"


def print_row(label: str, results: dict[str, float]) -> None:
    error = max((v for k, v in results.items() if k.endswith(" err")), default=float("nan"))
    print(
        f"| {label} | {results['dense']:.3f} | {cell(results, 'default')} | {cell(results, 'cutlass')} | "
        f"{cell(results, 'measured')} | {error:.1e} |",
        flush=True,
    )


def layer_rows(dtype_name: str, tokens: list[int]) -> None:
    dtype = DTYPES[dtype_name]
    for out_features, in_features in LAYERS:
        torch.manual_seed(0)
        model = pruned(nn.Sequential(nn.Linear(in_features, out_features)).cuda().to(dtype).eval())
        for n in tokens:
            x = torch.randn(n, in_features, device="cuda", dtype=dtype)
            print_row(f"{dtype_name} | Linear {in_features} -> {out_features} | {n}", compare(model, x))
        del model
        torch.cuda.empty_cache()


def mlp_rows(dtype_name: str, tokens: list[int]) -> None:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4096, 11008), nn.SiLU(), nn.Linear(11008, 4096)).cuda().to(dtype).eval()
    model = pruned(mlp)
    for n in tokens:
        x = torch.randn(n, 4096, device="cuda", dtype=dtype)
        print_row(f"{dtype_name} | MLP 4096 -> 11008 -> 4096 | {n}", compare(model, x))


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 0 without a GPU that has semi-structured sparse kernels."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    args = parser.parse_args(argv)
    if not semi_structured_available():
        print("two_four_gpu: no CUDA GPU that runs semi-structured sparse weights; nothing measured.")
        return 0
    cusparselt = torch.backends.cusparselt.is_available() if hasattr(torch.backends, "cusparselt") else False
    print(f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; cuSPARSELt available: {cusparselt}")
    print("Median ms per forward (lower is better); speed-up = dense time / 2:4 time")
    print()
    print(
        "| dtype | layer | tokens | dense ms | default 2:4 ms | speed-up | CUTLASS 2:4 ms | speed-up | "
        "measured (example_inputs) ms | speed-up | rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        layer_rows(dtype_name, args.tokens)
        mlp_rows(dtype_name, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
