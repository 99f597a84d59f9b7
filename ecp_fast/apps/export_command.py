"""``ecp-fast export``: a pruned checkpoint in each export format, its file size and latency against dense.

::

    ecp-fast export pruned.pt --arch mlp:784,300,100,10
    ecp-fast export pruned.pt --arch mlp:784,300,100,10 --batch 1 256 --threads 2 --out exported/
    ecp-fast export pruned.pt --arch import:mypackage.models:make_net --input-shape 3,32,32

The checkpoint is ``torch.save(model.state_dict())`` of a pruned model (``weight_orig`` /
``weight_mask`` entries as ``torch.nn.utils.prune`` writes them; a dense state dict or a
``save_compact`` file works too). ``--arch`` builds the architecture: ``mlp:784,300,100,10[:act]``
is ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` with ``act`` one of relu (default), tanh,
gelu, sigmoid; ``import:package.module:function`` calls ``function()`` for the model. The table gives,
per format, the layers' formats, the state-dict size, and the minimum time per call over interleaved
rounds with the speed-up against dense (ratios within one run).
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecp_fast.export import FORMATS, exported_layers, interleaved_times, load_compact, save_compact
from ecp_fast.export import export as export_model
from ecp_fast.export.compact import COMPACT_FORMAT
from ecp_fast.export.semi_structured import semi_structured_available
from ecp_fast.pruning.masks import apply_masks_from_state_dict

logger = logging.getLogger(__name__)

NAME = "export"
HELP = "file size and latency of a pruned checkpoint in each export format (dense, csr, 2:4)"
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ecp-fast export``."""
    parser.add_argument("checkpoint", type=Path, help="state_dict of the pruned model (torch.save), or a compact file")
    parser.add_argument(
        "--arch", required=True, help="mlp:784,300,100,10[:relu|tanh|gelu|sigmoid] or import:package.module:function"
    )
    parser.add_argument(
        "--input-shape",
        default=None,
        help="shape of one input sample, e.g. 3,32,32 (default: the first size of an mlp arch)",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=None,
        help="formats to compare (default: dense csr, and 2:4 on a GPU that supports it)",
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 256], help="batch sizes to time (default 1 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing (default 1)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument(
        "--max-density",
        type=float,
        default=None,
        help="csr: convert the Linear layers of at most this density (default: modelled crossover)",
    )
    parser.add_argument(
        "--measure", action="store_true", help="csr: choose each layer's format by timing it on the largest batch"
    )
    parser.add_argument("--device", default="cpu", help="device to run on (default cpu; 2:4 needs cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for <format>.pt full-model files and compact.ecp (load .pt files with "
        "torch.load(path, weights_only=False); no ecp_fast needed)",
    )


def build_arch(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The model an ``--arch`` spec describes and, for an mlp, its input sample shape."""
    kind, _, rest = spec.partition(":")
    if kind == "mlp":
        sizes_text, _, activation = rest.partition(":")
        try:
            sizes = [int(size) for size in sizes_text.split(",")]
        except ValueError:
            raise UsageError(f"--arch {spec!r}: mlp sizes must be integers, e.g. mlp:784,300,100,10") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"--arch {spec!r}: an mlp needs at least two positive sizes, e.g. mlp:784,300,100,10")
        activation = activation or "relu"
        if activation not in ACTIVATIONS:
            raise UsageError(f"--arch {spec!r}: activation must be one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers += [nn.Linear(fan_in, fan_out)] + ([ACTIVATIONS[activation]()] if index < len(sizes) - 2 else [])
        return nn.Sequential(*layers), (sizes[0],)
    if kind == "import":
        module_name, _, function_name = rest.rpartition(":")
        try:
            model = getattr(importlib.import_module(module_name), function_name)()
        except (ImportError, AttributeError, ValueError, TypeError) as error:
            raise UsageError(f"--arch {spec!r}: cannot build the model ({error})") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"--arch {spec!r}: {function_name}() returned {type(model).__name__}, not an nn.Module")
        return model, None
    raise UsageError(f"--arch {spec!r}: expected mlp:SIZES[:ACTIVATION] or import:package.module:function")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected positive integers separated by commas") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected positive integers separated by commas")
    return shape


def load_checkpoint(path: Path, model: nn.Module) -> nn.Module:
    """``model`` with the checkpoint's weights and masks (a state dict), or the dense model of a compact file."""
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for files it cannot read
        raise UsageError(
            f"checkpoint {str(path)!r} is not a state dict saved with torch.save "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0][:160] if str(error) else ''})"
        ) from None
    if isinstance(state, dict) and state.get("format") == COMPACT_FORMAT:
        try:
            return load_compact(path, model, "dense")
        except ValueError as error:
            raise UsageError(f"checkpoint {str(path)!r}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"checkpoint {str(path)!r}: expected a state dict (torch.save(model.state_dict()))")
    try:
        apply_masks_from_state_dict(model, state)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as error:
        first = " ".join(str(error).split())[:300]
        raise UsageError(f"checkpoint {str(path)!r} does not fit --arch: {first}") from None
    return model


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _describe_layers(model: nn.Module) -> str:
    kinds = list(exported_layers(model).values())
    return ", ".join(f"{kinds.count(kind)} {kind}" for kind in ("csr", "2:4", "dense") if kind in kinds)


def _export_all(model: nn.Module, args: argparse.Namespace, example: torch.Tensor) -> dict[str, nn.Module]:
    formats = args.formats or ["dense", "csr"] + (["2:4"] if semi_structured_available(args.device) else [])
    if "dense" not in formats:
        formats = ["dense", *formats]  # the baseline of every ratio
    exported = {}
    for name in formats:
        options: dict[str, Any] = {}
        if name == "csr":
            options = {"max_density": args.max_density, "example_inputs": example if args.measure else None}
        try:
            exported[name] = export_model(model, name, **options).eval()
        except ValueError as error:
            raise UsageError(str(error)) from None
    return exported


def _timings(models: dict[str, nn.Module], inputs: torch.Tensor, rounds: int) -> dict[str, float]:
    synchronize = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)

    def call(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model(inputs)
            synchronize()

        return run

    with torch.inference_mode():
        times = interleaved_times({name: call(model) for name, model in models.items()}, rounds=rounds)
    return {name: timing.minimum for name, timing in times.items()}


def _check_numbers(args: argparse.Namespace) -> None:
    if args.threads < 1 or args.rounds < 1 or min(args.batch) < 1:
        raise UsageError("--threads, --rounds and --batch must be at least 1")
    if args.max_density is not None and not 0.0 <= args.max_density <= 1.0:
        raise UsageError(f"--max-density must be in [0, 1], got {args.max_density}")
    if args.max_density is not None and args.measure:
        raise UsageError("--max-density and --measure exclude each other")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {args.device!r}: {str(error).splitlines()[0]}") from None


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    _check_numbers(args)
    model, mlp_shape = build_arch(args.arch)
    input_shape = parse_shape(args.input_shape) if args.input_shape else mlp_shape
    if input_shape is None:
        raise UsageError(f"--input-shape is needed with --arch {args.arch!r}")
    model = load_checkpoint(args.checkpoint, model)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval(), input_shape


def _table(args: argparse.Namespace) -> list[str]:
    """The lines of the comparison table (runs everything; raises UsageError for user mistakes)."""
    model, input_shape = _prepare(args)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    batches = {batch: torch.randn((batch, *input_shape), generator=generator).to(device, dtype) for batch in args.batch}
    torch.set_num_threads(args.threads)  # before exporting: --measure times the layers with these threads
    exported = _export_all(model, args, batches[max(batches)])
    times = {batch: _timings(exported, inputs, args.rounds) for batch, inputs in batches.items()}
    sizes = {name: _state_dict_bytes(module) for name, module in exported.items()}
    header = f"{'format':<7} {'layers':<18} {'state dict':>12} {'smaller':>8}"
    header += "".join(f" {f'batch {batch} (us)':>16} {'speed-up':>9}" for batch in args.batch)
    lines = [
        f"{args.checkpoint} --arch {args.arch}, {args.threads} thread(s), {args.device}, {args.dtype}, "
        f"minimum of {args.rounds} interleaved rounds",
        "",
        header,
    ]
    for name, module in exported.items():
        line = f"{name:<7} {_describe_layers(module):<18} {sizes[name]:>12,} {sizes['dense'] / sizes[name]:>7.2f}x"
        for batch in args.batch:
            seconds = times[batch][name]
            line += f" {seconds * 1e6:>16.1f} {times[batch]['dense'] / seconds:>8.2f}x"
        lines.append(line)
    compact = io.BytesIO()
    compact_bytes = save_compact(model, compact)
    lines += [
        "",
        f"compact file (save_compact): {compact_bytes:,} bytes, {sizes['dense'] / compact_bytes:.2f}x "
        f"smaller than the dense state dict; checkpoint on disk: {args.checkpoint.stat().st_size:,} bytes",
    ]
    if args.out is not None:
        lines.append(_write_files(args.out, exported, compact.getvalue()))
    return lines


def _write_files(folder: Path, exported: dict[str, nn.Module], compact: bytes) -> str:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in exported.items():
            torch.save(module, folder / f"{name.replace(':', '-')}.pt")
        (folder / "compact.ecp").write_bytes(compact)
    except OSError as error:
        raise UsageError(f"--out {str(folder)!r}: {error}") from None
    return f"wrote {', '.join(name.replace(':', '-') + '.pt' for name in exported)} and compact.ecp to {folder}"


def run(args: argparse.Namespace) -> int:
    """Run ``ecp-fast export``; 0 on success, 2 (one line on stderr) for a user error."""
    threads = torch.get_num_threads()
    try:
        lines = _table(args)
    except UsageError as error:
        print(f"ecp-fast export: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m ecp_fast.apps.export_command``) until the CLI wires it in."""
    parser = argparse.ArgumentParser(prog="ecp-fast export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
