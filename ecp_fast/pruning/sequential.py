"""Sequential (block-by-block) pruning for models too large to calibrate or hold on a device at once.

As in SparseGPT and Wanda, the model is a sequence of blocks (transformer layers, MLP blocks). Block
``k`` is calibrated on the outputs of blocks ``0 .. k-1`` *after* they were pruned, so every block
learns to compensate what the earlier ones lost, then it is pruned, and its pruned outputs become the
inputs of block ``k + 1``::

    report = prune_sequential(model.blocks, embeddings, sparsity=0.5, method="ecp", sensitivity="local")

Criteria: ``"local"`` (``c = 1``: each layer reconstructs its own output, no backward pass) or
``"output"`` (the block's output is the reference output: sensitivities are the output gradients of
the block alone, estimated with Rademacher probes when the block output is large). A network-level
``"loss"`` has no meaning for one block and is refused. ``scope`` ranks weights within a block
(``"global"`` means across the layers of one block; blocks are never ranked against each other,
since block ``k + 1``'s scores depend on how block ``k`` was pruned).

Memory model (what is resident at one time, besides the blocks themselves, which stay where they
are unless ``device`` is given):

* activations: the current block's inputs for the whole calibration set, ``tokens x d`` values (for
  2048 tokens of width 1024 in float32, 8 MiB), plus the next block's inputs while they are being
  produced, so at most two sets. They are kept on the compute device, or on the CPU with
  ``offload_activations=True`` (each batch is then copied to the device when it is used);
* one block on the compute device when ``device`` is given (it is moved there, calibrated, pruned,
  run forward and moved back before the next block is touched);
* one block's statistics: the weighted mean and ``M2`` (two floats per weight), its importances and
  bias shifts (two more) and the pruner's copy of its weights, i.e. about five times that block's
  weights; they are freed before the next block starts;
* with ``atomic=True`` (the default), a CPU snapshot of the blocks (one transaction, taken before the
  first block is touched) so that a failure in block ``k`` restores blocks ``0 .. k-1``; this is
  one extra copy of the model's weights in host memory. ``atomic=False`` drops it: a failure then
  leaves the blocks before the failing one pruned, and the error says which.

In a ``torch.distributed`` job, give each rank its shard of the inputs: every block's statistics are
merged across ranks (:func:`~ecp_fast.distributed.synchronize_calibration`) before it is pruned, so
all ranks prune every block identically and feed their own shard forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast.distributed import per_rank_probe_seed, synchronize_calibration
from ecp_fast.pruning.batches import BlockInputs, capture_block_inputs, count_samples, module_device
from ecp_fast.pruning.calibration import resolve_layers
from ecp_fast.pruning.importance import get_method
from ecp_fast.pruning.pruner import Pruner
from ecp_fast.pruning.reconstruction import RECONSTRUCTIVE_METHODS
from ecp_fast.pruning.report import PruneReport
from ecp_fast.pruning.selection import parse_scope, resolve_sparsity
from ecp_fast.pruning.transaction import model_transaction

logger = logging.getLogger(__name__)

SEQUENTIAL_SENSITIVITIES = ("local", "output")


# ---- report ----------------------------------------------------------------------------------------


@dataclass
class BlockReport:
    """One block: the pruner's report for its layers and the seconds it took (calibrate + prune + forward)."""

    index: int
    report: PruneReport
    seconds: float


@dataclass
class SequentialReport:
    """What :func:`prune_sequential` did; ``str(report)`` is a table with one row per block."""

    method: str
    sensitivity: str
    scope: str
    target_sparsity: float
    samples: int
    batches: int
    blocks: list[BlockReport] = field(default_factory=list)
    activation_bytes: int = 0  # the largest set of block inputs held at one time

    @property
    def total_weights(self) -> int:
        """Weights in the scored layers of every block."""
        return sum(block.report.total_weights for block in self.blocks)

    @property
    def total_pruned(self) -> int:
        """Weights removed (masked) in every block."""
        return sum(block.report.total_pruned for block in self.blocks)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the scored layers."""
        return self.total_pruned / self.total_weights if self.total_weights else 0.0

    @property
    def seconds(self) -> float:
        """Total time over all blocks."""
        return sum(block.seconds for block in self.blocks)

    def __str__(self) -> str:
        lines = [
            f"sequential method={self.method} sensitivity={self.sensitivity} scope={self.scope} "
            f"target={self.target_sparsity:.4g} achieved={self.sparsity:.4f} samples={self.samples} "
            f"batches={self.batches} activations={self.activation_bytes / 2**20:.1f} MiB",
            f"{'block':>5}  {'weights':>11}  {'pruned':>11}  {'sparsity':>8}  {'seconds':>8}",
        ]
        for block in self.blocks:
            lines.append(
                f"{block.index:>5}  {block.report.total_weights:>11}  {block.report.total_pruned:>11}  "
                f"{block.report.sparsity:>8.4f}  {block.seconds:>8.2f}"
            )
        lines.append(
            f"{'total':>5}  {self.total_weights:>11}  {self.total_pruned:>11}  {self.sparsity:>8.4f}  "
            f"{self.seconds:>8.2f}"
        )
        return "\n".join(lines)


# ---- arguments ----------------------------------------------------------------------------------


def _check_arguments(sparsity: float | None, method: str, sensitivity: str, scope: str, steps: int) -> None:
    if sensitivity not in SEQUENTIAL_SENSITIVITIES:
        raise ValueError(
            f"argument 'sensitivity' must be one of {SEQUENTIAL_SENSITIVITIES} for sequential pruning (a block has "
            f"no loss of its own), got {sensitivity!r}"
        )
    if method not in RECONSTRUCTIVE_METHODS and get_method(method).needs_loss:
        raise ValueError(f"argument 'method': {method!r} needs loss gradients, which a single block does not have")
    resolve_sparsity(sparsity if sparsity is not None else None, parse_scope(scope))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"argument 'steps' must be a positive integer, got {steps!r}")


def _block_list(blocks: Any) -> list[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            f"argument 'blocks' must be a sequence of modules or an nn.Sequential/nn.ModuleList, got "
            f"{type(blocks).__name__}; pass the model's list of blocks, or the model with blocks='model.layers'"
        )
    try:
        block_list = list(blocks)
    except TypeError:
        raise TypeError(f"argument 'blocks' must be a sequence of modules, got {type(blocks).__name__}") from None
    if not block_list:
        raise ValueError("argument 'blocks' must hold at least one block, got an empty sequence")
    for index, block in enumerate(block_list):
        if not isinstance(block, nn.Module):
            raise TypeError(f"argument 'blocks': item {index} must be an nn.Module, got {type(block).__name__}")
    return block_list


def _tensor_inputs(inputs: Iterable[Any], storage: torch.device | None) -> list[BlockInputs]:
    """Calibration batches for the first block given directly: tensors (or captured BlockInputs)."""
    if isinstance(inputs, torch.Tensor):
        raise TypeError(
            "argument 'inputs' must be an iterable of batches (tensors), got a single tensor; wrap it in a list"
        )
    try:
        iterator = iter(inputs)
    except TypeError:
        raise TypeError(f"argument 'inputs' must be an iterable of tensors, got {type(inputs).__name__}") from None
    batches = []
    for index, batch in enumerate(iterator):
        if isinstance(batch, torch.Tensor):
            batch = BlockInputs(batch.detach())
        if not isinstance(batch, BlockInputs):
            raise TypeError(f"argument 'inputs': batch {index} must be a tensor, got {type(batch).__name__}")
        batches.append(batch.to(storage))
    if not batches:
        raise ValueError("argument 'inputs': the calibration data is empty (expected at least one batch, got 0)")
    return batches


def _first_block_inputs(
    model_or_blocks: Any, inputs: Iterable[Any], blocks: str | None, storage: torch.device | None
) -> tuple[list[nn.Module], list[BlockInputs]]:
    """The blocks and their first inputs: captured from a whole model, or given with a block list."""
    if isinstance(model_or_blocks, nn.Module) and not isinstance(model_or_blocks, (nn.Sequential, nn.ModuleList)):
        from ecp_fast.pruning.hf import resolve_blocks

        try:
            block_container = resolve_blocks(model_or_blocks, blocks)
        except ValueError as error:
            if blocks is not None:
                raise
            raise TypeError(
                f"argument 'blocks' must be a sequence of modules, an nn.Sequential/nn.ModuleList, or a model whose "
                f"blocks are found with path=...; got {type(model_or_blocks).__name__} ({error})"
            ) from None
        block_list = _block_list(block_container)
        return block_list, capture_block_inputs(model_or_blocks, block_container, inputs, storage=storage)
    if blocks is not None:
        raise ValueError("argument 'blocks' (an attribute path) needs the whole model as the first argument")
    return _block_list(model_or_blocks), _tensor_inputs(inputs, storage)


def _forward(
    block: nn.Module, batches: list[BlockInputs], device: torch.device, storage: torch.device
) -> list[BlockInputs]:
    """The next block's inputs: this block's outputs for every batch, in eval mode and without a graph."""
    modes = {module: module.training for module in block.modules()}
    block.eval()
    try:
        with torch.no_grad():
            return [batch.with_hidden(batch.to(device)(block).to(storage)) for batch in batches]
    finally:
        for module, mode in modes.items():
            module.train(mode)


# ---- one block -----------------------------------------------------------------------------------


@dataclass
class _Settings:
    """The per-block pruning settings of one call."""

    sparsity: float | None
    method: str
    sensitivity: str
    scope: str
    steps: int
    probes: int | None
    layers: Sequence[str] | None
    synchronize: bool
    seed: int
    reconstruct: bool
    allocation: str | None


def _prune_block(block: nn.Module, activations: list[BlockInputs], settings: _Settings) -> PruneReport:
    pruner = Pruner(
        block,
        sensitivity=settings.sensitivity,
        probes=settings.probes,
        layers=settings.layers,
        seed=settings.seed,
        progress=False,
    )
    with per_rank_probe_seed(pruner):  # independent probes per rank; the seed itself on rank 0
        pruner.calibrate(activations)
    if settings.synchronize and pruner.calibration is not None:
        pruner.calibration = synchronize_calibration(pruner.calibration)
    report = pruner.prune(
        sparsity=settings.sparsity,
        method=settings.method,
        scope=settings.scope,
        steps=settings.steps,
        reconstruct=settings.reconstruct,
        allocation=settings.allocation,
        divergence="mse",
    )
    assert isinstance(report, PruneReport)  # scope="neuron" was refused by _check_arguments
    return report


# ---- the entry point -------------------------------------------------------------------------------


@renamed_keyword("criterion", "sensitivity")
def prune_sequential(
    blocks: Sequence[nn.Module] | nn.Sequential | nn.ModuleList | nn.Module,
    inputs: Iterable[Any],
    sparsity: float | None = 0.5,
    *,
    method: str = "ecp",
    sensitivity: str = "local",
    scope: str = "layer",
    steps: int = 1,
    probes: int | None = None,
    layers: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    offload_activations: bool = False,
    atomic: bool = True,
    synchronize: bool = True,
    seed: int = 0,
    progress: bool = True,
    reconstruct: bool = False,
    allocation: str | None = None,
    path: str | None = None,
) -> SequentialReport:
    """Calibrate and prune ``blocks`` one at a time, each on the outputs of the already-pruned ones.

    ``blocks`` is the model's block list (each maps hidden states to hidden states; the first
    element of a returned tuple counts), pruned in place, with ``inputs`` the first block's batches
    (tensors); or the whole model, whose blocks are found at ``path`` (None tries the common ones)
    and whose first block's arguments (attention mask, position embeddings or ids, cache off) are
    captured from a forward pass on ``inputs`` (what the model takes; attention masks keep padding
    out) and given to every block. ``sparsity`` is per block; ``method`` any method that needs no
    loss, the reconstructive ones included (``reconstruct`` and ``allocation`` as in
    :meth:`~ecp_fast.pruning.pruner.Pruner.prune`, the search comparing block outputs);
    ``sensitivity`` ``"local"`` or ``"output"`` (the block's output); ``scope`` ``"layer"``, ``"row"``,
    ``"N:M"`` or ``"global"`` (within a block); ``steps``, ``probes``, ``layers`` (names within each
    block), ``seed`` as for the Pruner. ``device`` computes each block there; ``offload_activations``
    keeps activations on the CPU; ``atomic`` restores every block on any failure (one CPU copy of
    their tensors); ``synchronize`` merges statistics across ``torch.distributed`` ranks. Returns a
    :class:`SequentialReport`; bad arguments raise ``ValueError`` / ``TypeError`` before any change.
    """
    _check_arguments(sparsity, method, sensitivity, scope, steps)
    compute = None if device is None else torch.device(device)
    storage_device = torch.device("cpu") if offload_activations else compute
    block_list, activations = _first_block_inputs(blocks, inputs, path, storage_device)
    for block in block_list:  # fail before any change
        resolve_layers(block, layers)
    settings = _Settings(
        sparsity, method, sensitivity, scope, steps, probes, layers, synchronize, seed, reconstruct, allocation
    )
    target = float("nan") if sparsity is None else float(sparsity)
    samples = sum(count_samples(batch) for batch in activations)
    report = SequentialReport(method, sensitivity, scope, target, samples, batches=len(activations))
    with _atomic(block_list, atomic):
        _run_blocks(block_list, activations, settings, compute, storage_device, report, progress)
    logger.info(
        "sequential pruning of %d blocks: sparsity %.4f in %.1f s", len(block_list), report.sparsity, report.seconds
    )
    return report


@contextlib.contextmanager
def _atomic(block_list: list[nn.Module], atomic: bool) -> Iterator[None]:
    """On failure: every block back on its device and, with ``atomic``, exactly as it was."""
    homes = [module_device(block) for block in block_list]
    with contextlib.ExitStack() as stack:
        if atomic:
            stack.enter_context(model_transaction(*block_list, storage=torch.device("cpu")))
        try:
            yield
        except BaseException:
            for block, home in zip(block_list, homes, strict=True):
                block.to(home)
            restored = (
                "every block was restored" if atomic else "the blocks pruned before it stay pruned (atomic=False)"
            )
            logger.warning("sequential pruning failed; %s", restored)
            raise


def _run_blocks(
    block_list: list[nn.Module],
    activations: list[BlockInputs],
    settings: _Settings,
    compute: torch.device | None,
    storage_device: torch.device | None,
    report: SequentialReport,
    progress: bool,
) -> None:
    for index, block in enumerate(tqdm(block_list, desc="prune blocks", disable=not progress, leave=False)):
        started = time.perf_counter()
        home = module_device(block)
        if compute is not None:
            block.to(compute)
        run_device = module_device(block)
        block_report = _prune_block(block, [batch.to(run_device) for batch in activations], settings)
        storage = storage_device if storage_device is not None else run_device
        report.activation_bytes = max(report.activation_bytes, sum(batch.nbytes for batch in activations))
        activations = _forward(block, activations, run_device, storage)
        if compute is not None:
            block.to(home)
        seconds = time.perf_counter() - started
        report.blocks.append(BlockReport(index=index, report=block_report, seconds=seconds))
        logger.info("block %d/%d: sparsity %.4f in %.2f s", index + 1, len(block_list), block_report.sparsity, seconds)
