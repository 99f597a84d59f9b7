"""``ecp-fast experiment lm``: prune a small Llama-style language model trained on Python's own documentation.

A Llama-style causal LM (``transformers.LlamaForCausalLM`` built from a config, random
initialisation; default hidden 256, 4 layers, the issue's trial size, 3.3 M parameters) is trained
on the offline corpus of :mod:`ecp_fast.apps.corpus` (``pydoc_data`` topics and standard-library
docstrings, byte tokenizer), or reused from the cache (``--cache-dir``, default ``<out>/cache``;
saved with ``save_pretrained``). Copies of it are pruned with every ``--methods`` entry at every
``--settings`` entry (default 50% and 70% per output row, and 2:4), through ``ecp_fast.prune``
called with tokenizer-style dict batches; the output head and the embeddings are left out, as
Wanda and SparseGPT do. For each, the held-out perplexity (per byte), the wall-clock time and the
peak extra resident memory of the pruning call (calibration included) are recorded.

Writes to ``--out``: ``lm_results.csv``, ``lm_tables.md`` (also printed) and ``lm_perplexity.png``.
``--quick`` trains a tiny model for a few steps (well under a minute, for CI).

Methods take their sensitivity from ``--sensitivity`` (default ``output``, Rademacher probes, see
``--probes``), except ``wanda`` (its column norms need no backward pass: ``local``) and
``sparsegpt`` (the library's default); ``magnitude`` and ``random`` get no calibration data.
Other methods (``sparsegpt``, ``ecp-obs``, ...) run when the library offers them.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

import ecp_fast
from ecp_fast.apps.corpus import ByteTokenizer, Corpus, python_docs_corpus, token_windows
from ecp_fast.apps.experiments._common import limit_threads, write_csv

if TYPE_CHECKING:  # transformers is an optional extra, imported where the experiment runs
    from transformers import LlamaForCausalLM

try:  # a one-line message and status 2 on the command line, where the CLI has it
    from ecp_fast.apps.errors import UsageError
except ImportError:  # pragma: no cover - older command line
    UsageError = ValueError  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)

NAME = "lm"
HELP = "a small Llama-style LM on Python's documentation: perplexity, time and memory of each pruning method"

DEFAULT_METHODS = "magnitude,wanda,ecp,sparsegpt,ecp-obs"
DEFAULT_SETTINGS = "50%:row,70%:row,2:4"
#: Methods calibrated without a backward pass whatever ``--sensitivity`` says.
LOCAL_METHODS = ("wanda",)
#: Methods that use the library's default sensitivity.
LIBRARY_DEFAULT_SENSITIVITY = ("sparsegpt",)
#: Methods that need no calibration data.
DATA_FREE_METHODS = ("magnitude", "random")


@dataclass(frozen=True)
class ModelShape:
    """The Llama configuration of the experiment."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    vocab: int = ByteTokenizer.vocab_size


@dataclass(frozen=True)
class Training:
    """How the dense model is trained (AdamW, linear warm-up then cosine decay, gradient clipping 1)."""

    steps: int
    batch: int
    lr: float
    seed: int


@dataclass(frozen=True)
class Setting:
    """One pruning target: a label for tables, the sparsity (None for N:M) and the pruner's scope."""

    label: str
    sparsity: float | None
    scope: str


# ---- options ------------------------------------------------------------------------------------


def parse_settings(text: str) -> list[Setting]:
    """``"50%:row,70%:row,2:4"``: sparsities with a scope (``row``, ``layer``, ``global``), or ``N:M`` patterns."""
    expected = (
        "--settings must be comma-separated SPARSITY:SCOPE entries (e.g. 50%:row, 0.7:layer) or N:M patterns (e.g. 2:4)"
    )
    settings = []
    for part in (piece.strip() for piece in str(text).split(",")):
        if not part:
            continue
        left, _, right = part.partition(":")
        if left.isdigit() and right.isdigit():
            if not 0 < int(left) < int(right):
                raise UsageError(f"{expected}; N:M needs 0 < N < M, got {part!r}")
            settings.append(Setting(part, None, part))
            continue
        if right not in ("row", "layer", "global"):
            raise UsageError(f"{expected}, got {part!r}")
        try:
            value = float(left.rstrip("%"))
        except ValueError:
            raise UsageError(f"{expected}, got {part!r}") from None
        sparsity = value / 100 if left.endswith("%") or value >= 1 else value
        if not 0.0 < sparsity < 1.0:
            raise UsageError(f"{expected}; the sparsity must be in (0, 100%), got {part!r}")
        settings.append(Setting(f"{sparsity:.0%} {right}", sparsity, right))
    if not settings:
        raise UsageError(f"{expected}, got {text!r}")
    return settings


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, in order, without duplicates."""
    methods = list(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    if not methods:
        raise UsageError(f"--methods must name at least one method (e.g. {DEFAULT_METHODS}), got {text!r}")
    return methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecp-fast experiment lm``."""
    parser.add_argument("--out", type=Path, default=Path("runs/lm"), help="output folder (default runs/lm)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the trained model and parsed corpus are cached (default <out>/cache)",
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated pruning methods, any the library offers (default {DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        # argparse %-formats help strings: a literal % is written %%
        help=f"SPARSITY:SCOPE entries and N:M patterns (default {DEFAULT_SETTINGS.replace('%', '%%')})",
    )
    parser.add_argument(
        "--sensitivity",
        default="output",
        choices=("output", "loss", "local"),
        help="sensitivity of the methods that use one (default output; wanda always local)",
    )
    parser.add_argument("--probes", type=int, default=8, help="Rademacher probes of the output sensitivity (default 8)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP width (default 688)")
    parser.add_argument("--context", type=int, default=128, help="tokens (bytes) per sequence (default 128)")
    parser.add_argument("--train-steps", type=int, default=300, help="AdamW steps of training (default 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per training step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument(
        "--calibration-sequences",
        type=int,
        default=32,
        help="training sequences streamed for calibration, 8 per batch (default 32)",
    )
    parser.add_argument(
        "--eval-sequences", type=int, default=256, help="held-out sequences for the perplexity (default 256)"
    )
    parser.add_argument(
        "--corpus", default="topics,docstrings", help="corpus sources: topics and/or docstrings (default both)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and probes")
    parser.add_argument(
        "--calibration-seeds",
        type=int,
        default=3,
        help="calibration draws (sequences and probes) per pruning point, averaged (default 3; --quick 1)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="seconds: hidden 64, 2 layers, 20 training steps, 4 calibration sequences"
    )


def _quick(args: argparse.Namespace) -> argparse.Namespace:
    quick = copy.copy(args)
    quick.hidden, quick.layers, quick.heads, quick.intermediate, quick.context = 64, 2, 2, 128, 64
    quick.train_steps, quick.batch_size, quick.lr = 20, 8, 3e-3
    quick.calibration_sequences, quick.eval_sequences, quick.probes = 4, 16, 2
    quick.calibration_seeds = 1
    quick.corpus = "topics"
    return quick


def validate(args: argparse.Namespace) -> None:
    """Check every option before the run (the command line calls it); ``UsageError`` names the option."""
    parse_methods(args.methods)
    parse_settings(args.settings)
    for name in (
        "probes",
        "hidden",
        "layers",
        "heads",
        "intermediate",
        "context",
        "batch_size",
        "calibration_sequences",
        "eval_sequences",
        "threads",
    ):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.train_steps < 0:
        raise UsageError(f"--train-steps must be an integer >= 0, got {args.train_steps}")
    if args.hidden % args.heads:
        raise UsageError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    sources = [part.strip() for part in args.corpus.split(",") if part.strip()]
    if not sources or any(source not in ("topics", "docstrings") for source in sources):
        raise UsageError(f"--corpus must name topics and/or docstrings, got {args.corpus!r}")


# ---- the model ---------------------------------------------------------------------------------------


def build_model(shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (untied head, no biases, no cache)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model: nn.Module, corpus: Corpus, shape: ModelShape, training: Training, progress: bool) -> list[float]:
    """Train in place on random windows of the training text; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, training.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, training.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    windows = token_windows(corpus.train, shape.context, count=training.steps * training.batch, seed=training.seed)
    losses = []
    model.train()
    bar = tqdm(range(training.steps), desc="train", disable=not progress, leave=False)
    for step in bar:
        loss = _lm_loss(model, windows[step * training.batch : (step + 1) * training.batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def load_or_train(
    shape: ModelShape, training: Training, corpus: Corpus, corpus_key: str, cache: Path, progress: bool
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The trained model from ``cache`` when one with the same settings is there, else train and save it."""
    import transformers

    key = hashlib.blake2b(
        json.dumps([asdict(shape), asdict(training), corpus_key], sort_keys=True).encode(), digest_size=6
    ).hexdigest()
    folder = cache / f"lm-{key}"
    info_path = folder / "training.json"
    if info_path.exists():
        model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        info = json.loads(info_path.read_text())
        logger.info("reusing the trained model in %s", folder)
        return model, {**info, "cached": True}
    model = build_model(shape, training.seed)
    started = time.perf_counter()
    losses = train(model, corpus, shape, training, progress)
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - started,
        "final_train_loss": float(sum(losses[-10:]) / max(1, len(losses[-10:]))) if losses else float("nan"),
        "shape": asdict(shape),
        "training": asdict(training),
    }
    model.save_pretrained(folder)
    info_path.write_text(json.dumps(info, indent=2))
    return model, {**info, "cached": False}


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Per-byte perplexity ``exp(mean cross-entropy)`` of next-byte prediction on ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# ---- measuring ------------------------------------------------------------------------------------


def _limit_malloc_caching() -> None:
    """Ask glibc to return freed blocks above 128 KiB to the system, so that RSS follows live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, which also ends its dynamic growth
    except (OSError, AttributeError):  # not glibc: the figures include the allocator's caching
        pass


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond (``/proc``; NaN elsewhere)."""

    def __init__(self) -> None:
        self.base: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = _rss()
            if value is not None and self.peak is not None:
                self.peak = max(self.peak, value)
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss()
        if self.base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        value = _rss()
        if value is not None and self.peak is not None:
            self.peak = max(self.peak, value)

    @property
    def extra_mib(self) -> float:
        """Peak above the level at entry, MiB."""
        if self.base is None or self.peak is None:
            return float("nan")
        return (self.peak - self.base) / 2**20


# ---- pruning ------------------------------------------------------------------------------------------


def _sensitivity(method: str, requested: str) -> str | None:
    if method in LOCAL_METHODS:
        return "local"
    if method in LIBRARY_DEFAULT_SENSITIVITY:
        return None
    return requested


def check_methods(methods: Sequence[str]) -> None:
    """Fail before training when a method is unknown: each prunes a tiny network once."""
    for method in methods:
        torch.manual_seed(0)
        tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        batches = [torch.randn(16, 8)]
        try:
            ecp_fast.prune(
                tiny,
                None if method in DATA_FREE_METHODS else batches,
                sparsity=0.5,
                method=method,
                scope="row",
                progress=False,
                **_sensitivity_kwargs(method, "local"),
            )
        except ValueError as error:
            raise UsageError(f"--methods: {method!r} cannot prune ({error})") from error


def _sensitivity_kwargs(method: str, requested: str) -> dict[str, Any]:
    sensitivity = _sensitivity(method, requested)
    return {} if sensitivity is None or method in DATA_FREE_METHODS else {"sensitivity": sensitivity}


def calibration_batches(corpus: Any, shape: ModelShape, sequences: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Tokenizer-style batches of 8 training windows drawn with ``seed``."""
    windows = token_windows(corpus.train, shape.context, count=sequences, seed=seed)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in torch.split(windows, 8)]


def prune_copy(
    dense: nn.Module,
    method: str,
    setting: Setting,
    batches: list[dict[str, torch.Tensor]],
    args: argparse.Namespace,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``dense`` and what the pruning call cost (time, peak extra memory)."""
    model = copy.deepcopy(dense)
    data = None if method in DATA_FREE_METHODS else batches
    with PeakMemory() as memory:
        started = time.perf_counter()
        report = ecp_fast.prune(
            model,
            data,
            sparsity=setting.sparsity,
            method=method,
            scope=setting.scope,
            probes=args.probes,
            seed=seed,
            progress=False,
            **_sensitivity_kwargs(method, args.sensitivity),
        )
        seconds = time.perf_counter() - started
    assert isinstance(report, ecp_fast.PruneReport)  # a weight scope, not scope="neuron"
    return model, {
        "sparsity": report.sparsity,
        "seconds": seconds,
        "peak_extra_mib": memory.extra_mib,
        "sensitivity": _sensitivity(method, args.sensitivity) if data is not None else "",
    }


# ---- reporting ----------------------------------------------------------------------------------------


METRICS = ("perplexity", "seconds", "peak_extra_mib")


def mean_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean (and ``<metric>_std``, the spread over calibration seeds) per (method, setting)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["setting"]), []).append(row)
    summary = {}
    for key, members in groups.items():
        entry: dict[str, float] = {"count": float(len(members))}
        for metric in METRICS:
            values = torch.tensor([float(member[metric]) for member in members], dtype=torch.float64)
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std(unbiased=False)) if len(members) > 1 else 0.0
        summary[key] = entry
    return summary


def markdown_tables(rows: list[dict[str, Any]], settings: Sequence[Setting], methods: Sequence[str]) -> str:
    """Perplexity, seconds and peak extra memory as method x setting tables (best perplexity in bold);
    means over calibration seeds, the perplexity with its spread."""
    lookup = mean_rows(rows)
    dense = next(row for row in rows if row["method"] == "dense")
    parts = []
    for metric, title, fmt in (
        ("perplexity", "held-out perplexity per byte (lower is better)", ".3f"),
        ("seconds", "seconds per pruning call (calibration included)", ".2f"),
        ("peak_extra_mib", "peak extra resident memory of the pruning call, MiB", ".0f"),
    ):
        header = "| method | " + " | ".join(setting.label for setting in settings) + " |"
        lines = [
            f"**{title}**" + (f" (dense: {dense['perplexity']:.3f})" if metric == "perplexity" else ""),
            "",
            header,
            "| --- |" + " ---: |" * len(settings),
        ]
        best = {}
        if metric == "perplexity":
            for setting in settings:
                values = [lookup[(m, setting.label)][metric] for m in methods if (m, setting.label) in lookup]
                best[setting.label] = min(values) if values else None
        for method in methods:
            cells = []
            for setting in settings:
                row = lookup.get((method, setting.label))
                if row is None:
                    cells.append("")
                    continue
                text = format(row[metric], fmt)
                if metric == "perplexity" and row["count"] > 1:
                    text += f" ± {row['perplexity_std']:{fmt}}"
                cells.append(f"**{text}**" if best.get(setting.label) == row[metric] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], settings: Sequence[Setting], methods: Sequence[str], path: Path) -> None:
    """Grouped bars: perplexity per setting and method (dense as a line), and seconds per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookup = mean_rows(rows)
    dense = next(row for row in rows if row["method"] == "dense")["perplexity"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(methods))
    for panel, (metric, label) in zip(
        axes, (("perplexity", "held-out perplexity per byte"), ("seconds", "seconds per pruning call")), strict=True
    ):
        for index, method in enumerate(methods):
            xs = [position + (index - (len(methods) - 1) / 2) * width for position in range(len(settings))]
            values = [
                lookup[(method, s.label)][metric] if (method, s.label) in lookup else float("nan") for s in settings
            ]
            panel.bar(xs, values, width=width, label=method)
        if metric == "perplexity":
            panel.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
            panel.set_yscale("log")
        panel.set_xticks(range(len(settings)), [setting.label for setting in settings])
        panel.set_ylabel(label)
        panel.grid(True, axis="y", which="both", alpha=0.3)
        panel.legend(fontsize=8)
    figure.suptitle("Llama-style byte LM on Python's documentation: one-shot pruning", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- the run --------------------------------------------------------------------------------------------


def _summary(
    shape: ModelShape, training: Training, info: dict[str, Any], corpus: Corpus, context: dict[str, Any], draws: int
) -> str:
    """The line above the tables: model, training, corpus, calibration and evaluation."""
    trained = "cached" if info["cached"] else f"{info['train_seconds']:.0f} s"
    return (
        f"Llama-style byte LM: hidden {shape.hidden}, {shape.layers} layers, {info['parameters']:,} parameters, "
        f"{training.steps} training steps ({trained}; final training loss {info['final_train_loss']:.3f} nats/byte); "
        f"{corpus}; calibration {context['calibration_tokens']} tokens x {draws} draw(s), "
        f"evaluation {context['eval_tokens']} held-out tokens; {context['threads']} thread(s)."
    )


def _dense_row(dense_perplexity: float) -> dict[str, Any]:
    return {
        "method": "dense",
        "setting": "",
        "scope": "",
        "target": 0.0,
        "calibration_seed": "",
        "sparsity": 0.0,
        "perplexity": dense_perplexity,
        "seconds": 0.0,
        "peak_extra_mib": 0.0,
        "sensitivity": "",
    }


def _pruned_rows(
    dense: nn.Module,
    jobs: list[tuple[int, str, Setting]],
    draws: dict[int, list[dict[str, torch.Tensor]]],
    eval_windows: torch.Tensor,
    args: argparse.Namespace,
    progress: bool,
) -> list[dict[str, Any]]:
    """One row per (calibration seed, method, setting): a pruned copy's cost and held-out perplexity."""
    rows: list[dict[str, Any]] = []
    for seed, method, setting in tqdm(jobs, desc="prune", disable=not progress, leave=False):
        pruned, cost = prune_copy(dense, method, setting, draws[seed], args, seed)
        rows.append(
            {
                "method": method,
                "setting": setting.label,
                "scope": setting.scope,
                "target": setting.sparsity if setting.sparsity is not None else float("nan"),
                "calibration_seed": seed,
                **cost,
                "perplexity": perplexity(pruned, eval_windows),
            }
        )
        logger.info("%s %s: perplexity %.3f in %.2f s", method, setting.label, rows[-1]["perplexity"], cost["seconds"])
        del pruned
    return rows


def run(args: argparse.Namespace) -> int:
    """Train (or reuse) the model, prune it with every method and setting, write the tables, CSV and plot."""
    try:
        import transformers
    except ImportError:
        raise UsageError("the lm experiment needs transformers: pip install 'ecp_fast[transformers]'") from None
    validate(args)
    settings = parse_settings(args.settings)
    methods = parse_methods(args.methods)
    if args.quick:
        args = _quick(args)
    limit_threads(args.threads)
    _limit_malloc_caching()
    transformers.logging.set_verbosity_error()
    progress = logger.getEffectiveLevel() <= logging.WARNING
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir is not None else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    check_methods(methods)

    sources = [part.strip() for part in args.corpus.split(",") if part.strip()]
    max_bytes = 200_000 if args.quick else None
    corpus = python_docs_corpus(sources, max_bytes=max_bytes, cache_dir=cache)
    logger.info("%s", corpus)
    shape = ModelShape(args.hidden, args.layers, args.heads, args.intermediate, args.context)
    training = Training(args.train_steps, args.batch_size, args.lr, args.seed)
    dense, info = load_or_train(shape, training, corpus, f"{sources}:{max_bytes}", cache, progress)

    eval_windows = token_windows(corpus.heldout, shape.context, count=args.eval_sequences)
    rows = [_dense_row(perplexity(dense, eval_windows))]
    seeds = range(args.seed, args.seed + max(1, args.calibration_seeds))
    draws = {seed: calibration_batches(corpus, shape, args.calibration_sequences, seed + 1) for seed in seeds}
    jobs = [(seed, method, setting) for seed in seeds for method in methods for setting in settings]
    rows += _pruned_rows(dense, jobs, draws, eval_windows, args, progress)
    context = {
        "parameters": info["parameters"],
        "train_steps": training.steps,
        "final_train_loss": info["final_train_loss"],
        "calibration_tokens": sum(batch["input_ids"].numel() for batch in draws[args.seed]),
        "eval_tokens": eval_windows.numel(),
        "threads": args.threads,
        "probes": args.probes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for row in rows:
        row.update(context)
    write_csv(out / "lm_results.csv", rows)
    tables = markdown_tables(rows, settings, methods)
    summary = _summary(shape, training, info, corpus, context, len(seeds))
    (out / "lm_tables.md").write_text(f"{summary}\n\n{tables}\n")
    plot(rows, settings, methods, out / "lm_perplexity.png")
    print(summary)
    print()
    print(tables)
    logger.info("lm experiment done in %.1f s; results in %s", time.perf_counter() - started, out)
    return 0
