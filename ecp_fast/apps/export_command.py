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
import contextlib
import importlib
import io
import itertools
import logging
import pickle
import re
import sys
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ecp_fast.apps.errors import UsageError as CommandLineError
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


class UsageError(CommandLineError):
    """A mistake in the command line or its files: reported in one line, exit status 2.

    A :class:`ecp_fast.apps.errors.UsageError`, so that ``ecp-fast``'s own ``validate`` reports it too.
    """


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
        "--measure",
        action="store_true",
        help="csr and 2:4: choose each layer's format by timing it on the largest batch",
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
        return _import_arch(spec, rest), None
    raise UsageError(f"--arch {spec!r}: expected mlp:SIZES[:ACTIVATION] or import:package.module:function")


def _import_arch(spec: str, target: str) -> nn.Module:
    """The model ``function()`` of ``import:package.module:function`` returns; ``UsageError`` naming --arch."""
    module_name, _, function_name = target.rpartition(":")
    try:
        builder = getattr(importlib.import_module(module_name), function_name)
    except Exception as error:  # importing runs the user's module, which may raise anything
        raise UsageError(f"--arch {spec!r}: cannot build the model ({type(error).__name__}: {error})") from error
    if not callable(builder):
        raise UsageError(f"--arch {spec!r}: {function_name} is a {type(builder).__name__}, not a function")
    try:
        model = builder()
    except Exception as error:  # the user's builder may raise anything; name the option that called it
        raise UsageError(
            f"--arch {spec!r}: cannot build the model: {function_name}() raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec!r}: {function_name}() returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected positive integers separated by commas") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected positive integers separated by commas")
    return shape


#: What ``export`` reads, for the messages about a checkpoint it cannot use.
EXPECTED_CHECKPOINT = "a state dict saved with torch.save(model.state_dict()) or a save_compact file"


def _unreadable(path: Path, error: Exception) -> str:
    """What the checkpoint ``torch.load(weights_only=True)`` refused holds, in plain words.

    torch's own message is long, multi-line and carries terminal escape codes; only the class it
    refused to unpickle is taken from it.
    """
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if unsafe:
        return (
            f"a torch.save file that holds a {unsafe.group(1)} object, not only tensors (a whole model? save "
            "model.state_dict() instead); it is not unpickled because that could run code"
        )
    try:
        with path.open("rb") as handle:
            start = handle.read(8)
    except OSError as os_error:
        return f"a file that cannot be read ({os_error.strerror or os_error})"
    if start.startswith(b"PK\x03\x04"):
        return f"a zip archive that torch.load(weights_only=True) cannot read ({type(error).__name__})"
    return f"a file that is not a torch.save file (its first bytes: {start!r})" if start else "an empty file"


def _found(state: Any) -> str:
    """``state`` (a loaded checkpoint that is not a state dict) described for a message."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    key, value = next((key, value) for key, value in state.items() if not isinstance(value, torch.Tensor))
    return f"a dict whose entry {key!r} is a {type(value).__name__}, not a tensor"


def load_checkpoint(path: Path, model: nn.Module) -> nn.Module:
    """``model`` with the checkpoint's weights and masks (a state dict), or the dense model of a compact file."""
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for files it cannot read
        raise UsageError(
            f"checkpoint {str(path)!r}: expected {EXPECTED_CHECKPOINT}, found {_unreadable(path, error)}"
        ) from error
    if isinstance(state, dict) and state.get("format") == COMPACT_FORMAT:
        try:
            return load_compact(path, model, "dense")
        except ValueError as error:
            raise UsageError(f"checkpoint {str(path)!r}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"checkpoint {str(path)!r}: expected {EXPECTED_CHECKPOINT}, found {_found(state)}")
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
        elif name == "2:4" and args.measure:
            options = {"example_inputs": example}
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
    _check_device(args.device)


#: The device types ``--device`` accepts: the timing synchronizes CUDA and nothing else, and a
#: ``meta`` tensor holds no numbers to export or time.
DEVICE_TYPES = ("cpu", "cuda")
ACCEPTED_DEVICES = "cpu, or cuda / cuda:N when a CUDA GPU is available"


def _check_device(text: str) -> None:
    """``UsageError`` naming --device unless ``text`` is a device this torch can use now."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {text!r}: {str(error).splitlines()[0]}") from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {text!r}: expected {ACCEPTED_DEVICES}, got a {device.type} device")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device {text!r}: expected an available device, but {why}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text!r}: expected a CUDA index below {torch.cuda.device_count()}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as error:  # torch asserts for backends it was built without
        raise UsageError(f"--device {text!r}: the device is not usable ({type(error).__name__}: {error})") from None


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    _check_numbers(args)
    model, mlp_shape = build_arch(args.arch)
    input_shape = parse_shape(args.input_shape) if args.input_shape else mlp_shape
    if input_shape is None:
        raise UsageError(f"--input-shape is needed with --arch {args.arch!r}")
    model = load_checkpoint(args.checkpoint, model).eval()
    _check_input(model, input_shape, args.input_shape)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]), input_shape


#: Layers whose expected input :func:`_expects` can name.
KNOWN_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _expects(name: str, module: nn.Module) -> str:
    """What layer ``name`` takes, for the message of a failed probe."""
    if isinstance(module, nn.Linear):
        return f"layer {name!r} (Linear) expects a last size of {module.in_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        return (
            f"layer {name!r} ({type(module).__name__}) expects {module.in_channels} channels "
            f"then {len(module.kernel_size)} spatial sizes"
        )
    return f"layer {name!r} ({type(module).__name__}) fails on what it receives"


def _failing_layer(model: nn.Module, probe: torch.Tensor) -> str | None:
    """Run ``model`` on ``probe``; None if it runs, else which layer failed and what it expects."""
    running: list[tuple[str, nn.Module]] = []  # the modules entered and not yet left: the last one failed

    def enter(module: nn.Module, _: Any, name: str = "") -> None:
        running.append((name, module))

    def leave(*_: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [
                module.register_forward_pre_hook(partial(enter, name=name)),
                module.register_forward_hook(leave),
            ]
    try:
        with torch.no_grad():
            model(probe)
    except (RuntimeError, ValueError, IndexError) as error:
        # Outside every submodule (the model's own forward code), the first Linear / convolution hints at the input.
        first = next((item for item in model.named_modules() if isinstance(item[1], KNOWN_LAYERS)), None)
        where = f"{_expects(*running[-1])}; " if running else (f"its first {_expects(*first)}; " if first else "")
        return f"{where}{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    finally:
        for handle in handles:
            handle.remove()
    return None


def _check_input(model: nn.Module, shape: tuple[int, ...], option: str | None) -> None:
    """Run ``model`` (in eval mode, on CPU) once on a batch of 1: a wrong shape is the user's --input-shape."""
    # Checked here, before the export and the timing, so that the failure names the option, not torch's matmul.
    weight = next((tensor for tensor in model.parameters() if tensor.is_floating_point()), torch.zeros(0))
    failure = _failing_layer(model, torch.zeros((1, *shape), dtype=weight.dtype, device=weight.device))
    if failure is not None:
        given = f"--input-shape {option}" if option else f"the input size {shape[0]} of the mlp --arch"
        raise UsageError(f"{given}: the model does not run on an input of shape {(1, *shape)} (batch of 1): {failure}")


def size_comparison(size: int, reference: int) -> str:
    """``size`` against ``reference`` in words: "2.50x smaller than", "1.14x larger than" or "the same size as"."""
    if size == reference:
        return "the same size as"
    if size < reference:
        return f"{reference / size:.2f}x smaller than"
    return f"{size / reference:.2f}x larger than"


def _table(args: argparse.Namespace, model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The lines of the comparison table (exports, times, writes; raises UsageError for user mistakes)."""
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
        f"compact file (save_compact): {compact_bytes:,} bytes, {size_comparison(compact_bytes, sizes['dense'])} "
        f"the dense state dict; checkpoint on disk: {args.checkpoint.stat().st_size:,} bytes",
    ]
    if args.out is not None:
        lines.append(_write_files(args.out.expanduser(), exported, compact.getvalue()))
    return lines


def _file_writers(exported: dict[str, nn.Module], compact: bytes) -> dict[str, Callable[[BinaryIO], object]]:
    """``{file name: function that writes the file's content to an open binary file}`` for ``--out``."""
    writers: dict[str, Callable[[BinaryIO], object]] = {
        f"{name.replace(':', '-')}.pt": partial(torch.save, module) for name, module in exported.items()
    }
    writers["compact.ecp"] = lambda handle: handle.write(compact)
    return writers


def _move_into_place(folder: Path, temporaries: dict[str, Path]) -> None:
    """Rename each temporary file onto ``folder / name``; on a failure, remove the files it added."""
    added: list[Path] = []
    try:
        for name, temporary in temporaries.items():
            target = folder / name
            existed = target.exists() or target.is_symlink()
            temporary.replace(target)
            if not existed:
                added.append(target)
    except OSError:
        for target in added:  # files that were there before the run stay (some may hold the new content)
            with contextlib.suppress(OSError):
                target.unlink()
        raise


def _write_files(folder: Path, exported: dict[str, nn.Module], compact: bytes) -> str:
    """Write ``<format>.pt`` and ``compact.ecp`` to ``folder``: all of them, or none (``UsageError``).

    Each file is first written to a temporary file in ``folder``; the temporaries are renamed into
    place only once all are written, and removed when anything fails. Other files are left alone.
    """
    writers = _file_writers(exported, compact)
    temporaries: dict[str, Path] = {}
    name = ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in writers:
            if (folder / name).is_dir():
                raise UsageError(f"--out {str(folder)!r}: expected {name} to be a file or absent, found a folder")
        for name, write in writers.items():
            temporaries[name] = folder / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
            with temporaries[name].open("xb") as handle:
                write(handle)
        name = ", ".join(writers)
        _move_into_place(folder, temporaries)
    except (OSError, RuntimeError, pickle.PicklingError) as error:  # torch.save raises RuntimeError too
        raise UsageError(f"--out {str(folder)!r}: cannot write {name} ({type(error).__name__}: {error})") from None
    finally:
        for temporary in temporaries.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
    return f"wrote {', '.join(list(writers)[:-1])} and compact.ecp to {folder}"


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of the path ``folder`` that do not exist yet, deepest first."""
    missing = []
    folder = folder.expanduser().absolute()
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_new_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, as :func:`_missing_folders` lists them) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never created: look at the folder above
        except OSError:
            return  # not empty: keep it and every folder above it


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no export and no timing: the options, the checkpoint, --arch, --input-shape.

    ``ecp-fast`` calls it before it creates ``--out`` (and :func:`run` when the command runs on its
    own), so that a checkpoint that is missing or does not fit leaves no folder behind. The loaded
    model is kept in ``args`` for the run, and so are the folders of ``--out`` that do not exist
    yet: :func:`run` removes them, if still empty, when a later step fails.
    """
    if getattr(args, "export_prepared", None) is not None:
        return
    args.export_new_folders = [] if args.out is None else _missing_folders(args.out)
    args.export_prepared = _prepare(args)


def run(args: argparse.Namespace) -> int:
    """Run ``ecp-fast export``; 0 on success, 2 (one line on stderr) for a user error.

    A failed run leaves no ``--out`` file or folder that it (or ``ecp-fast`` before it) created.
    """
    threads = torch.get_num_threads()
    try:
        validate(args)
        lines = _table(args, *args.export_prepared)
    except UsageError as error:
        _remove_new_folders(getattr(args, "export_new_folders", []))
        print(f"ecp-fast export: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        return 2
    except BaseException:
        _remove_new_folders(getattr(args, "export_new_folders", []))
        raise
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
