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
  leaves the blocks before the failing one pruned (and the failing one, when only its forward pass
  failed). Either way a note added to the error (its type and message unchanged) and a log line
  say in which block it failed and what was restored or stays pruned.

In a ``torch.distributed`` job, give each rank its shard of the inputs: every block's statistics are
merged across ranks (:func:`~ecp_fast.distributed.synchronize_calibration`) before it is pruned, so
all ranks prune every block identically and feed their own shard forward. With ``synchronize=False``
nothing is merged: each rank prunes its blocks from its own data alone, exactly as a single process
would (same probe seed too), and the ranks' masks may differ.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast._iterables import known_length
from ecp_fast.distributed import check_agreement, checked_seed, per_rank_probe_seed
from ecp_fast.pruning.allocation import ALLOCATIONS
from ecp_fast.pruning.batches import (
    BlockInputs,
    capture_block_inputs,
    count_samples,
    describe,
    eval_mode,
    module_device,
    passes_through,
)
from ecp_fast.pruning.calibration import CalibrationResult, resolve_layers
from ecp_fast.pruning.importance import IMPORTANCES, get_method
from ecp_fast.pruning.pruner import Pruner, check_activation_cache
from ecp_fast.pruning.reconstruction import RECONSTRUCTIVE_METHODS
from ecp_fast.pruning.report import PruneReport
from ecp_fast.pruning.selection import parse_scope, resolve_sparsity
from ecp_fast.pruning.transaction import ModelTransaction, model_transaction

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
    """What :func:`prune_sequential` did; ``str(report)`` is a table with one row per block.

    ``target_sparsity`` is the resolved per-block target (implied by an N:M scope, 0.9 when
    ``sparsity=None``), as each block's :class:`PruneReport` has it. ``samples`` and ``batches`` are
    those the blocks' statistics were computed from, as :meth:`Pruner.calibrate
    <ecp_fast.pruning.pruner.Pruner.calibrate>` counts them: under ``torch.distributed`` with
    ``synchronize=True`` the totals over all ranks (the same on every rank), otherwise this
    process's own.
    """

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


def _check_arguments(settings: _Settings) -> None:
    """Every per-block setting, checked before anything is captured or changed; first, where the ranks
    merge their statistics, that every rank was given the same (a different call fails on all at once)."""
    if settings.synchronize:
        check_agreement(settings, _own_process_group(True), "prune_sequential")
    if settings.sensitivity not in SEQUENTIAL_SENSITIVITIES:
        raise ValueError(
            f"argument 'sensitivity' must be one of {SEQUENTIAL_SENSITIVITIES} for sequential pruning (a block has "
            f"no loss of its own), got {settings.sensitivity!r}"
        )
    _check_method(settings.method)
    resolve_sparsity(settings.sparsity, parse_scope(settings.scope))
    steps, probes = settings.steps, settings.probes
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"argument 'steps' must be a positive integer, got {steps!r}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"argument 'probes' must be a positive integer or None, got {probes!r}")
    _check_allocation(settings.method, settings.scope, settings.reconstruct, settings.allocation)
    reconstructs = settings.reconstruct is True or settings.method in RECONSTRUCTIVE_METHODS
    check_activation_cache(settings.activation_cache, reconstructs)


def _check_method(method: object) -> None:
    """A method that needs no loss: a registered importance or a reconstructive method."""
    known = sorted({*IMPORTANCES, *RECONSTRUCTIVE_METHODS})
    if not isinstance(method, str) or method not in known:
        raise ValueError(f"argument 'method' must be one of {known}, got {method!r}")
    if method not in RECONSTRUCTIVE_METHODS and get_method(method).needs_loss:
        raise ValueError(f"argument 'method': {method!r} needs loss gradients, which a single block does not have")


def _check_allocation(method: str, scope: str, reconstruct: object, allocation: object) -> None:
    """``reconstruct`` a bool; ``allocation`` None, or a known one where it has an effect."""
    if not isinstance(reconstruct, bool):  # reconstruct="no" would otherwise count as true
        raise TypeError(f"argument 'reconstruct' must be a bool, got {type(reconstruct).__name__} {reconstruct!r}")
    if allocation is None:
        return
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"argument 'allocation' must be one of {ALLOCATIONS} or None, got {allocation!r}")
    if not reconstruct and method not in RECONSTRUCTIVE_METHODS:
        raise ValueError(
            f"argument 'allocation' splits the sparsity only when pruning reconstructs (reconstruct=True, or a "
            f"method in {sorted(RECONSTRUCTIVE_METHODS)}); got allocation={allocation!r} with method={method!r} "
            "and reconstruct=False, which would ignore it"
        )
    if parse_scope(scope).kind != "global" and allocation != "uniform":
        raise ValueError(
            f"argument 'allocation': scope={scope!r} prunes every layer of a block to the same sparsity "
            f"(allocation='uniform'), got allocation={allocation!r}; scope='global' lets layers differ"
        )


def _check_flags(**flags: object) -> None:
    """Switches must be bools: a string such as "no" would count as true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"argument {name!r} must be a bool, got {type(value).__name__} {value!r}")


def _compute_device(device: object) -> torch.device | None:
    """``device`` as a ``torch.device`` this process can compute on; None leaves each block where it is."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"argument 'device' must be a torch.device, a string such as 'cuda:0', or None, got {type(device).__name__}"
        )
    try:
        compute = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"argument 'device' must name a device such as 'cpu' or 'cuda:0', got {device!r} ({error})"
        ) from None
    if compute.type == "meta":
        raise ValueError("argument 'device': blocks cannot compute on 'meta' (it holds no values), got 'meta'")
    try:
        torch.empty(0, device=compute)  # the cheapest question the device can answer
    except (RuntimeError, AssertionError) as error:  # no CUDA build raises AssertionError
        raise ValueError(f"argument 'device': {device!r} is not available in this process ({error})") from None
    return compute


def _check_inputs(inputs: object) -> None:
    """An iterable of batches: a lone tensor or mapping is one batch, and would be iterated row by row."""
    if isinstance(inputs, torch.Tensor):
        single = "a single tensor"
    elif isinstance(inputs, Mapping):
        single = f"a single mapping ({type(inputs).__name__}, one batch)"
    elif isinstance(inputs, (str, bytes)) or not (isinstance(inputs, Iterable) or hasattr(inputs, "__getitem__")):
        raise TypeError(
            f"argument 'inputs' must be an iterable of batches (a list, a DataLoader), got {type(inputs).__name__}"
        )
    else:
        if known_length(inputs) == 0:
            raise ValueError("argument 'inputs': the calibration data is empty (expected at least one batch, got 0)")
        return
    raise TypeError(
        f"argument 'inputs' must be an iterable of batches (a list, a DataLoader), got {single}; wrap it in a list"
    )


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
    batches = []
    for index, batch in enumerate(inputs):  # _check_inputs made sure it is an iterable of batches
        if isinstance(batch, torch.Tensor):
            batch = BlockInputs(batch.detach())
        if not isinstance(batch, BlockInputs):
            raise TypeError(f"argument 'inputs': batch {index} must be a tensor, got {type(batch).__name__}")
        batches.append(batch.to(storage))
    if not batches:
        raise ValueError("argument 'inputs': the calibration data is empty (expected at least one batch, got 0)")
    return batches


def _resolve_blocks(model_or_blocks: Any, path: str | None) -> tuple[list[nn.Module], list[str], nn.Module | None]:
    """The blocks, a label for each (for the errors and logs), and the whole model when one was given."""
    if isinstance(model_or_blocks, nn.Module) and not isinstance(model_or_blocks, (nn.Sequential, nn.ModuleList)):
        from ecp_fast.pruning.hf import resolve_blocks

        try:
            block_container = resolve_blocks(model_or_blocks, path)
        except ValueError as error:
            if path is not None:
                raise
            raise TypeError(
                f"argument 'blocks' must be a sequence of modules, an nn.Sequential/nn.ModuleList, or a model whose "
                f"blocks are found with path=...; got {type(model_or_blocks).__name__} ({error})"
            ) from None
        block_list = _block_list(block_container)
        names = {id(module): name for name, module in model_or_blocks.named_modules()}
        return block_list, [f"{names[id(block)]}, {type(block).__name__}" for block in block_list], model_or_blocks
    if path is not None:
        raise ValueError(
            "argument 'path' (the attribute path of the blocks) needs the whole model as the first argument"
        )
    block_list = _block_list(model_or_blocks)
    return block_list, [type(block).__name__ for block in block_list], None


def _first_inputs(
    model: nn.Module | None, block_list: list[nn.Module], inputs: Iterable[Any], storage: torch.device | None
) -> list[BlockInputs]:
    """The first block's inputs: captured from a forward pass of the whole model, or given as tensors."""
    if model is None:
        activations = _tensor_inputs(inputs, storage)
        _check_first_block(block_list[0], activations)
        return activations
    return capture_block_inputs(model, block_list, inputs, storage=storage)


def _check_first_block(block: nn.Module, activations: list[BlockInputs]) -> None:
    """``ValueError`` naming ``inputs`` when the first block does not run on the first batch given (a
    wrong width, a wrong dtype): the library feeds every later block, the caller feeds this one."""
    if not activations:
        return
    with eval_mode(block), torch.no_grad():
        try:
            activations[0].to(module_device(block))(block)
        except Exception as error:
            if passes_through(error):
                raise
            first = describe(activations[0].hidden)
            reason = str(error).splitlines()[0] if str(error) else ""
            raise ValueError(
                f"argument 'inputs': the first block does not run on the first batch ({first}): "
                f"{type(error).__name__}: {reason}"
            ) from error


def _forward(
    block: nn.Module, batches: list[BlockInputs], device: torch.device, storage: torch.device
) -> list[BlockInputs]:
    """The next block's inputs: this block's outputs for every batch, in eval mode and without a graph."""
    with eval_mode(block), torch.no_grad():
        return [batch.with_hidden(batch.to(device)(block).to(storage)) for batch in batches]


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
    add_bias: bool = True
    activation_cache: float | None = None


def _own_process_group(synchronize: bool) -> Any:
    """The Pruner's ``process_group``: None merges over the default group (when one is initialised).

    Without ``synchronize`` it is a group this rank is not a member of (what ``dist.new_group``
    returns to non-members), which has no other ranks to merge with: the Pruner then calibrates (and
    recalibrates between steps) from this rank's data alone, as a single process would, and keeps
    its inputs as a single process does.
    """
    if synchronize or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.GroupMember.NON_GROUP_MEMBER


def _prune_block(
    block: nn.Module, activations: list[BlockInputs], settings: _Settings
) -> tuple[PruneReport, CalibrationResult | None]:
    """Calibrate and prune one block; returns its report and the calibration it was pruned from."""
    pruner = Pruner(
        block,
        sensitivity=settings.sensitivity,
        probes=settings.probes,
        layers=settings.layers,
        seed=settings.seed,
        progress=False,
        process_group=_own_process_group(settings.synchronize),
        add_bias=settings.add_bias,
    )
    # Pruner.calibrate merges the statistics across ranks (unless told not to, above).
    if settings.synchronize:
        with per_rank_probe_seed(pruner):  # independent probes per rank; the seed itself on rank 0
            pruner.calibrate(activations)
    else:  # each rank on its own: the seed it would use alone
        pruner.calibrate(activations)
    calibration = pruner.calibration
    report = pruner.prune(
        sparsity=settings.sparsity,
        method=settings.method,
        scope=settings.scope,
        steps=settings.steps,
        reconstruct=settings.reconstruct,
        allocation=settings.allocation,
        divergence="mse",
        activation_cache=settings.activation_cache,
    )
    assert isinstance(report, PruneReport)  # scope="neuron" was refused by _check_arguments
    return report, calibration


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
    add_bias: bool = True,
    activation_cache: float | None = None,
) -> SequentialReport:
    """Calibrate and prune ``blocks`` one at a time, each on the outputs of the already-pruned ones.

    ``blocks`` is the model's block list (each maps hidden states to hidden states; the first
    element of a returned tuple counts), pruned in place, with ``inputs`` the first block's batches
    (tensors); or the whole model, whose blocks are found at ``path`` (None tries the common ones)
    and whose first block's arguments (attention mask, position embeddings or ids, cache off) are
    captured from a forward pass on ``inputs`` (what the model takes; attention masks keep padding
    out) and given to every block. Either way ``inputs`` is an iterable of batches: a lone tensor or
    mapping is refused (wrap it in a list). ``sparsity`` is per block; ``method`` any method that
    needs no loss, the reconstructive ones included (``reconstruct`` and ``allocation`` as in
    :meth:`~ecp_fast.pruning.pruner.Pruner.prune`, the search comparing block outputs; an
    ``allocation`` without reconstruction is refused); ``sensitivity`` ``"local"`` or ``"output"``;
    ``scope`` ``"layer"``, ``"row"``, ``"N:M"`` or ``"global"`` (within a block); ``steps``,
    ``probes``, ``layers`` (names within each block), ``seed`` as for the Pruner. ``device``
    computes each block there; ``offload_activations`` keeps activations on the CPU; ``atomic``
    restores every block on any failure (one CPU copy of their tensors); ``synchronize`` merges statistics
    across ranks (False: each rank prunes from its own data); ``add_bias``, ``activation_cache`` as for
    the Pruner. A failure's error notes its block and what stays pruned. Returns a :class:`SequentialReport`.
    """
    settings = _Settings(
        sparsity, method, sensitivity, scope, steps, probes, layers, synchronize, checked_seed(seed), reconstruct,
        allocation, add_bias, activation_cache,
    )  # fmt: skip
    _check_arguments(settings)
    flags = {"offload_activations": offload_activations, "atomic": atomic, "synchronize": synchronize}
    _check_flags(**flags, progress=progress, add_bias=add_bias)
    compute = _compute_device(device)
    block_list, labels, model = _checked_blocks(blocks, inputs, path, layers)
    storage_device = torch.device("cpu") if offload_activations else compute
    activations = _first_inputs(model, block_list, inputs, storage_device)
    report = _empty_report(settings, activations)
    with _guarded(block_list, labels, atomic) as state:
        _run_blocks(block_list, activations, settings, state, compute, storage_device, report, progress)
    logger.info(
        "sequential pruning of %d blocks: sparsity %.4f in %.1f s", len(block_list), report.sparsity, report.seconds
    )
    return report


def _checked_blocks(
    blocks: Any, inputs: Any, path: str | None, layers: Sequence[str] | None
) -> tuple[list[nn.Module], list[str], nn.Module | None]:
    """:func:`_resolve_blocks`, once ``inputs`` and every block's ``layers`` are checked (before any change)."""
    _check_inputs(inputs)
    block_list, labels, model = _resolve_blocks(blocks, path)
    for block in block_list:
        resolve_layers(block, layers)
    return block_list, labels, model


def _empty_report(settings: _Settings, activations: list[BlockInputs]) -> SequentialReport:
    """The report before any block: the settings and the size of this process's calibration data
    (replaced by the calibrated counts, merged across ranks when they are, after the first block)."""
    target = resolve_sparsity(settings.sparsity, parse_scope(settings.scope))  # as each PruneReport has it
    samples = sum(count_samples(batch) for batch in activations)
    return SequentialReport(
        settings.method, settings.sensitivity, settings.scope, target, samples, batches=len(activations)
    )


@dataclass
class _Progress:
    """How far a run got: the block being worked on, and how many blocks have their masks installed."""

    current: int | None = None
    pruned: int = 0


@contextlib.contextmanager
def _guarded(block_list: list[nn.Module], labels: list[str], atomic: bool) -> Iterator[_Progress]:
    """On failure: every block back on its device and, with ``atomic``, exactly as it was. The error
    gets a note, and the log a line, saying in which block it failed and what was done about it."""
    homes = [module_device(block) for block in block_list]
    transaction = model_transaction(*block_list, storage=torch.device("cpu")) if atomic else None
    state = _Progress()
    try:
        yield state
    except BaseException as error:
        outcome = _undo(block_list, homes, transaction, state.pruned)
        where = "before its first block"
        if state.current is not None:
            where = f"in block {state.current} of {len(block_list)} ({labels[state.current]})"
        message = f"prune_sequential failed {where}; {outcome}"
        logger.warning("%s", message)
        if hasattr(error, "add_note"):  # Python 3.11+; the user's exception keeps its type and message
            error.add_note(message)
        raise


def _undo(
    block_list: list[nn.Module], homes: list[torch.device], transaction: ModelTransaction | None, pruned: int
) -> str:
    """Roll the blocks back (with a ``transaction``) and move them home; returns what was done."""
    problems: list[str] = []
    if transaction is not None:
        try:
            transaction.rollback()
        except RuntimeError as failure:
            problems.append(str(failure))
    for index, (block, home) in enumerate(zip(block_list, homes, strict=True)):
        try:
            block.to(home)
        except Exception as failure:  # keep going: the other blocks still go home
            problems.append(f"block {index} could not be moved back to {home}: {failure!r}")
    if transaction is not None:
        done = "every block was restored" if not problems else "the blocks could not all be restored"
    elif pruned == 0:
        done = "no block was pruned (atomic=False)"
    else:
        stay = "block 0 stays" if pruned == 1 else f"blocks 0-{pruned - 1} stay"
        done = f"{stay} pruned (atomic=False)"
    return done + "".join(f"; {problem}" for problem in problems)


def _run_blocks(
    block_list: list[nn.Module],
    activations: list[BlockInputs],
    settings: _Settings,
    state: _Progress,
    compute: torch.device | None,
    storage_device: torch.device | None,
    report: SequentialReport,
    progress: bool,
) -> None:
    for index, block in enumerate(tqdm(block_list, desc="prune blocks", disable=not progress, leave=False)):
        state.current = index
        started = time.perf_counter()
        home = module_device(block)
        if compute is not None:
            block.to(compute)
        run_device = module_device(block)
        activations = [batch.for_block(index) for batch in activations]  # its own mask, rotary, ... where they differ
        block_report, calibration = _prune_block(block, [batch.to(run_device) for batch in activations], settings)
        state.pruned = index + 1
        if index == 0 and calibration is not None:  # merged totals when merged; every block sees as many
            report.samples, report.batches = calibration.samples, calibration.batches
        storage = storage_device if storage_device is not None else run_device
        report.activation_bytes = max(report.activation_bytes, sum(batch.nbytes for batch in activations))
        activations = _forward(block, activations, run_device, storage)
        if compute is not None:
            block.to(home)
        seconds = time.perf_counter() - started
        report.blocks.append(BlockReport(index=index, report=block_report, seconds=seconds))
        logger.info("block %d/%d: sparsity %.4f in %.2f s", index + 1, len(block_list), block_report.sparsity, seconds)
    state.current = None
