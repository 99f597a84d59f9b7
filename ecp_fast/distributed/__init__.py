"""Distributed calibration: every rank streams its own shard, the statistics are merged across ranks.

Everything ECP needs from the data is a mergeable sum (docs/method.md, "Streaming and merging"), so a
data-parallel job calibrates like this::

    torch.distributed.init_process_group("gloo")        # or "nccl" on GPUs, e.g. under torchrun
    pruner = Pruner(model, sensitivity="output", seed=0)  # same model weights and seed on every rank
    pruner.calibrate(shard(batches))                    # this rank's batches; merged across ranks
    pruner.prune(sparsity=0.5, method="ecp", scope="global")  # identical masks and biases everywhere

How the merge works. The weighted moments ``(S0, mu, M2)`` are not sums, so they are turned into sums
of *shifted* inputs around a shift ``c`` shared by all ranks (the rank-0 mean, broadcast):
``T0 = S0``, ``T1 = S0 (mu - c)``, ``T2 = M2 + S0 (mu - c)^2``. These add across ranks; one
all-reduce gives the totals and ``mu = c + T1 / T0``, ``M2 = T2 - T1^2 / T0`` converts back. Because
``c`` is close to every rank's mean, ``T1`` is small and the final subtraction loses no precision
(the same reason the kernels shift their inputs). The conversion runs in float64. The plain sums
(``activation_sq_sum``, ``loss_grad_sum``, ``samples``) are all-reduced as they are. The alternative
``strategy="gather"`` all-gathers the triples and folds them with :func:`~ecp_fast.merge_moments` in
rank order (``world_size`` copies of one layer's statistics in memory at a time).

Identical results on every rank. After the reduction every rank holds the same statistics (a cheap
bit-level fingerprint is compared across ranks; if a backend ever returned results that differ in
the last bit, rank 0's are broadcast), so with the same model weights every rank computes the same
scores, selects the same weights and adds the same bias compensation. What the user must do:

* start every rank from the same weights (same checkpoint, or :func:`broadcast_module`);
* give every rank the same ``seed``: the ``random`` method draws its scores from a generator seeded
  with the pruner's seed, so the same seed gives the same scores everywhere;
* Rademacher probes (``sensitivity="output"`` with many outputs) only affect each rank's own
  contribution, which is merged, so they cannot make ranks disagree. With the same seed on every
  rank, however, batch ``k`` of every rank is probed with the same signs, which correlates the
  estimates; :func:`rank_seed` gives each rank its own probe stream for calibration only.

Reconstructive pruning (``ecp-obs``, ``sparsegpt``, ``reconstruct=True``) runs the batches again:
every rank reconstructs from its own shard, and the layers' Gram matrices, the forward order and the
allocation search's divergences are summed or agreed across the ranks
(``ReconstructionRun.group``), so every rank ends with the masks and weights of one process on all
the batches.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ecp_fast._iterables import known_length
from ecp_fast.ops.merge import Moments, merge_moments
from ecp_fast.pruning.calibration import MAX_STORED_SAMPLES, CalibrationResult, LayerStatistics

logger = logging.getLogger(__name__)

#: Key set in ``CalibrationResult.extra`` once a result is merged across ranks (makes the merge idempotent).
SYNCHRONIZED_KEY = "synchronized_world_size"
STRATEGIES = ("allreduce", "gather")
#: Per-rank probe seeds are ``seed + RANK_SEED_STRIDE * rank``, far apart from nearby user seeds.
RANK_SEED_STRIDE = 1_000_003

T = TypeVar("T")
_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- process group helpers ---------------------------------------------------------------------------


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is available, initialised, and ``group`` has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def communication_device(group: Any = None) -> torch.device:
    """Where tensors must live for a collective: the current CUDA device for nccl, else the CPU.

    Without an initialised process group (a single process, like :func:`rank_and_world_size`'s
    ``(0, 1)``) there is no backend and no collective to run: the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place and return it; a no-op (no communication)
    when :func:`is_distributed` is false. A collective: every rank of ``group`` must call it with a
    tensor of the same shape and dtype. It is staged through :func:`communication_device` (and made
    contiguous) where it lives elsewhere."""
    if not is_distributed(group):
        return tensor
    device = communication_device(group)
    staged = tensor.detach()
    if staged.device != device or not staged.is_contiguous():
        staged = staged.to(device=device, memory_format=torch.contiguous_format, copy=True)
    dist.all_reduce(staged, group=group)
    if staged.data_ptr() != tensor.data_ptr():
        with torch.no_grad():
            tensor.copy_(staged)
    return tensor


def from_rank_zero(value: T, group: Any = None) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank of ``group``: a decision made alike
    everywhere. ``value`` itself, without communication, when :func:`is_distributed` is false; a
    collective otherwise."""
    if not is_distributed(group):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=_global_rank(0, group), group=group)
    return holder[0]


# ---- sharding ------------------------------------------------------------------------------------------


class Shard(Generic[T]):
    """Every ``world_size``-th item of ``items``, starting at ``rank`` (round-robin, lazy).

    Re-iterable whenever ``items`` is (a list, a DataLoader), which ``Pruner.prune(steps>1)`` needs;
    ``len()`` works whenever ``items`` has a length. Round-robin keeps the shards balanced to within
    one batch and works on streams whose length is unknown.
    """

    def __init__(self, items: Iterable[T], rank: int, world_size: int) -> None:
        self.items = items
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[T]:
        for index, item in enumerate(self.items):
            if index % self.world_size == self.rank:
                yield item

    def __len__(self) -> int:
        total = known_length(self.items)
        if total is None:
            raise TypeError(f"this Shard has no length: its items ({type(self.items).__name__}) have none")
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)


def shard(items: Iterable[T], rank: int | None = None, world_size: int | None = None, group: Any = None) -> Shard[T]:
    """This rank's share of the calibration batches: items ``rank, rank + world_size, ...``.

    ``rank`` and ``world_size`` default to those of ``group`` (``0`` and ``1`` without
    ``torch.distributed``, i.e. everything). Every rank must end up with at least one batch, since a
    rank with no data cannot calibrate; when ``items`` has a length this is checked here. For a
    map-style dataset, ``torch.utils.data.DistributedSampler(dataset, shuffle=False)`` in a
    ``DataLoader`` does the same job at the sample level (see docs/scale.md).

    Raises:
        TypeError: ``items`` is not iterable (None, say).
        ValueError: ``rank`` / ``world_size`` are not integers in range (integral numbers such as
            ``numpy.int64`` are taken, ``bool`` is not), or ``items`` has fewer batches than ranks.
    """
    if items is None or not (isinstance(items, Iterable) or hasattr(items, "__getitem__")):
        raise TypeError(f"argument 'items' must be an iterable of batches, got {type(items).__name__}")
    default_rank, default_world = rank_and_world_size(group)
    given_world = default_world if world_size is None else world_size
    world = _integer(given_world)
    if world is None or world < 1:
        raise ValueError(f"argument 'world_size' must be a positive integer, got {given_world!r}")
    given_rank = default_rank if rank is None else rank
    index = _integer(given_rank)
    if index is None or not 0 <= index < world:
        raise ValueError(f"argument 'rank' must be an integer in [0, {world}), got {given_rank!r}")
    length = known_length(items)  # None for a stream of unknown length: not checked here
    if length is not None and length < world:
        raise ValueError(
            f"argument 'items': {length} batches cannot give each of {world} ranks at least one; "
            "use smaller batches or fewer ranks"
        )
    return Shard(items, index, world)


def _integer(value: object) -> int | None:
    """``value`` as a Python int when it is an integral number (``numpy.int64`` too), else None.

    ``bool`` is refused although it is an ``int``: ``rank=True`` is a mistake, not rank 1.
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


# ---- seeds and weights ---------------------------------------------------------------------------------


def rank_seed(seed: int, group: Any = None) -> int:
    """A seed for this rank's Rademacher probes: ``seed`` on rank 0, distinct on every other rank.

    Raises:
        TypeError: ``seed`` is not an integer (``bool`` and ``1.5`` are refused, ``numpy.int64`` taken).
    """
    rank, _ = rank_and_world_size(group)
    return checked_seed(seed) + RANK_SEED_STRIDE * rank


def checked_seed(seed: object) -> int:
    """``seed`` as a Python int; ``TypeError`` naming it unless it is an integral number (not ``bool``)."""
    value = _integer(seed)
    if value is None:
        raise TypeError(f"argument 'seed' must be an integer, got {type(seed).__name__} {seed!r}")
    return value


@contextmanager
def per_rank_probe_seed(pruner: Any, group: Any = None) -> Iterator[int]:
    """Within the block, ``pruner.seed`` is :func:`rank_seed` of it; it is restored on exit.

    Use it around ``pruner.calibrate(...)`` only, so each rank draws independent probes while the
    ``random`` method (seeded at ``prune`` time) still sees the same seed on every rank.
    """
    if not hasattr(pruner, "seed"):
        raise TypeError(f"argument 'pruner' must have a 'seed' attribute (a Pruner), got {type(pruner).__name__}")
    original = pruner.seed
    pruner.seed = rank_seed(original, group)
    try:
        yield pruner.seed
    finally:
        pruner.seed = original


def broadcast_module(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Copy ``src``'s parameters and buffers to every rank in place (no-op without distribution).

    Every rank must hold a module of the same structure (same state_dict keys and shapes).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"argument 'module' must be an nn.Module, got {type(module).__name__}")
    if not is_distributed(group):
        return
    device = communication_device(group)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            staged = tensor.detach().to(device)  # shares the storage when already on `device`
            dist.broadcast(staged, src=_global_rank(src, group), group=group)
            if tensor.device != device:
                tensor.copy_(staged.to(tensor.device))


def _global_rank(group_rank: int, group: Any) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ---- the merge -----------------------------------------------------------------------------------------


def synchronize_calibration(
    result: CalibrationResult, group: Any = None, strategy: str = "allreduce"
) -> CalibrationResult:
    """Merge every rank's :class:`CalibrationResult` into the statistics of the union of their data.

    A collective: every rank of ``group`` must call it, with results for the same layers (same names,
    shapes, and with or without loss gradients on all). Returns a new result, identical on every
    rank; ``result`` is not modified. It is a no-op (returns ``result``) when ``torch.distributed`` is
    not initialised, when the group has one rank, or when ``result`` was already synchronised, so it
    is safe to call more than once.

    Args:
        result: this rank's calibration (``Pruner.calibration`` or ``Calibrator.run``'s return).
        group: the process group; None is the default (world) group.
        strategy: ``"allreduce"`` (shifted sums, one all-reduce per tensor) or ``"gather"``
            (all-gather the triples and merge them in rank order with ``merge_moments``).

    The kept replay inputs (``result.inputs``, used by the ``nonlinear`` baseline) are gathered in rank
    order when every rank kept all of its inputs and the union fits ``MAX_STORED_SAMPLES``; otherwise
    the merged result keeps none. ``result.extra`` is copied from this rank, with
    ``extra["synchronized_world_size"]`` added.
    """
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"argument 'result' must be a CalibrationResult, got {type(result).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"argument 'strategy' must be one of {STRATEGIES}, got {strategy!r}")
    if not is_distributed(group) or SYNCHRONIZED_KEY in result.extra:
        return result
    rank, world_size = rank_and_world_size(group)
    device = communication_device(group)
    _check_layouts_agree(result, group, rank)

    statistics = _merged_statistics(result, group, device, strategy, world_size)
    samples, batches = _merge_counts(result, statistics, group, device)
    _make_identical(statistics, group, device, rank)
    inputs, inputs_complete = _gather_inputs(result, group)
    extra = dict(result.extra)
    extra[SYNCHRONIZED_KEY] = world_size
    merged_result = dataclasses.replace(
        result,
        statistics=statistics,
        samples=samples,
        batches=batches,
        inputs=inputs,
        inputs_complete=inputs_complete,
        extra=extra,
    )
    logger.info(
        "merged calibration of %d layers across %d ranks: %d samples in %d batches (this rank: %d samples)",
        len(statistics),
        world_size,
        merged_result.samples,
        merged_result.batches,
        result.samples,
    )
    return merged_result


def _merged_statistics(
    result: CalibrationResult, group: Any, device: torch.device, strategy: str, world_size: int
) -> dict[str, LayerStatistics]:
    """Every layer's moments and sums merged across the ranks (their ``samples`` still 0)."""
    statistics: dict[str, LayerStatistics] = {}
    for name, stats in result.statistics.items():  # one layer at a time bounds the extra memory
        if strategy == "allreduce":
            merged = _allreduce_moments(stats.moments, group, device)
        else:
            merged = _gather_moments(stats.moments, group, device, world_size)
        activation_sq_sum = _allreduce_sum(stats.activation_sq_sum, group, device)
        loss_grad_sum = None
        if stats.loss_grad_sum is not None:
            loss_grad_sum = _allreduce_sum(stats.loss_grad_sum, group, device)
        statistics[name] = LayerStatistics(
            moments=merged, activation_sq_sum=activation_sq_sum, loss_grad_sum=loss_grad_sum, samples=0
        )
    return statistics


def _merge_counts(
    result: CalibrationResult, statistics: dict[str, LayerStatistics], group: Any, device: torch.device
) -> tuple[int, int]:
    """Sum the sample and batch counts over the ranks (one all-reduce); sets each layer's ``samples``."""
    counts = torch.tensor(
        [result.samples, result.batches] + [stats.samples for stats in result.statistics.values()],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(counts, group=group)
    counts_list = counts.tolist()
    for index, name in enumerate(statistics):
        statistics[name].samples = int(counts_list[2 + index])
    return int(counts_list[0]), int(counts_list[1])


#: ``CalibrationResult.extra`` key of how a rank calibrated (sensitivity, probes): compared across ranks.
CALIBRATED_WITH_KEY = "calibrated_with"
#: What a rank whose own calibration failed contributes to the layout comparison, with its error.
FAILED = "failed"


def announce_failure(error: BaseException, group: Any = None) -> None:
    """Join the other ranks' layout comparison (:func:`synchronize_calibration`) with this rank's failure,
    so that they raise at once, naming it, instead of waiting for it until the collective times out.
    Nothing without :func:`is_distributed`."""
    if not is_distributed(group):
        return
    layouts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, (FAILED, f"{type(error).__name__}: {error}"), group=group)


def check_agreement(value: Any, group: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless every rank passed an equal ``value`` (the
    arguments of a call they all make alike; compared as their ``repr``). A collective; nothing
    without :func:`is_distributed`."""
    if not is_distributed(group):
        return
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, repr(value), group=group)  # as text: NaN equals NaN, nothing to unpickle
    for other_rank, other in enumerate(values):
        if other != values[0]:
            raise ValueError(
                f"{what}: rank {other_rank} was called with {other}, rank 0 with {values[0]} (this is rank "
                f"{dist.get_rank(group)}); every rank must make the same call"
            )


def _check_layouts_agree(result: CalibrationResult, group: Any, rank: int) -> None:
    """Raise ``ValueError`` on every rank unless all ranks calibrated the same layers the same way."""
    layout = (
        result.has_loss,
        result.extra.get(CALIBRATED_WITH_KEY),
        [
            (name, tuple(stats.moments.mean.shape), str(stats.moments.mean.dtype), stats.loss_grad_sum is not None)
            for name, stats in result.statistics.items()
        ],
    )
    layouts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    for other_rank, other in enumerate(layouts):
        if other[0] == FAILED:
            raise ValueError(
                f"synchronize_calibration: rank {other_rank} failed before the merge ({other[1]}; this is rank "
                f"{rank}); every rank must calibrate on data of its own (at least one batch)"
            )
        if other != layouts[0]:
            raise ValueError(
                f"synchronize_calibration: rank {other_rank} calibrated {other!r}, rank 0 calibrated {layouts[0]!r} "
                f"(this is rank {rank}); every rank must calibrate the same model, layers, dtype and sensitivity, "
                "with loss gradients on all ranks or on none"
            )


def _allreduce_sum(tensor: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    staged = tensor.detach().to(device=device, copy=True)
    dist.all_reduce(staged, group=group)
    return staged.to(tensor.device)


def _allreduce_moments(moments: Moments, group: Any, device: torch.device) -> Moments:
    """Shifted sums around rank 0's mean, all-reduced in float64, converted back to moments."""
    s0, mean, m2 = moments
    dtype, home = mean.dtype, mean.device
    wide = torch.float64
    shift = mean.detach().to(device=device, dtype=wide, copy=True)
    dist.broadcast(shift, src=_global_rank(0, group), group=group)
    s0_wide = s0.detach().to(device=device, dtype=wide)
    offset = mean.detach().to(device=device, dtype=wide) - shift
    weighted_offset = s0_wide.unsqueeze(-1) * offset  # T1 = S0 (mu - c)
    second = m2.detach().to(device=device, dtype=wide) + weighted_offset * offset  # T2 = M2 + S0 (mu - c)^2
    del offset
    total_s0 = s0_wide.clone()
    dist.all_reduce(total_s0, group=group)
    dist.all_reduce(weighted_offset, group=group)
    dist.all_reduce(second, group=group)
    positive = (total_s0 > 0).unsqueeze(-1)
    safe = torch.where(total_s0 > 0, total_s0, torch.ones_like(total_s0)).unsqueeze(-1)
    mean_offset = weighted_offset / safe
    merged_mean = torch.where(positive, shift + mean_offset, torch.zeros_like(shift))
    # M2 = T2 - T1^2 / T0; a negative value is rounding (docs/method.md) and is clamped like the kernels do.
    merged_m2 = torch.where(positive, (second - weighted_offset * mean_offset).clamp_min(0), torch.zeros_like(second))
    return Moments(
        total_s0.to(device=home, dtype=s0.dtype),
        merged_mean.to(device=home, dtype=dtype),
        merged_m2.to(device=home, dtype=m2.dtype),
    )


def _gather_moments(moments: Moments, group: Any, device: torch.device, world_size: int) -> Moments:
    """All-gather every rank's triple and merge in rank order (the same arithmetic on every rank)."""
    home = moments.mean.device
    parts = []
    for tensor in moments:
        staged = tensor.detach().to(device)
        gathered = [torch.empty_like(staged) for _ in range(world_size)]
        dist.all_gather(gathered, staged, group=group)
        parts.append(gathered)
    merged: Moments | None = None
    for index in range(world_size):
        triple = Moments(parts[0][index], parts[1][index], parts[2][index])
        merged = triple if merged is None else merge_moments(merged, triple)
    assert merged is not None
    return Moments(*(tensor.to(home) for tensor in merged))


def _fingerprint(statistics: dict[str, LayerStatistics], device: torch.device) -> torch.Tensor:
    """An int64 checksum of every bit of the merged statistics (equal bits give equal checksums)."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for stats in statistics.values():
        tensors = [*stats.moments, stats.activation_sq_sum]
        if stats.loss_grad_sum is not None:
            tensors.append(stats.loss_grad_sum)
        for position, tensor in enumerate(tensors, start=1):
            flat = tensor.detach().to(device).contiguous().reshape(-1)
            bits = flat.view(_SAME_WIDTH_INTEGER[flat.element_size()])
            # Position weights make swapped values change the checksum; int64 wraps around harmlessly.
            total += (bits.to(torch.int64) * position).sum() + flat.numel()
    return total


def _make_identical(statistics: dict[str, LayerStatistics], group: Any, device: torch.device, rank: int) -> None:
    """Compare checksums across ranks; if they differ, adopt rank 0's statistics bit for bit."""
    fingerprint = _fingerprint(statistics, device)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if bool(low == high):
        return
    logger.warning("merged statistics differ across ranks in the last bits; adopting rank 0's (this is rank %d)", rank)
    src = _global_rank(0, group)
    for stats in statistics.values():
        tensors = [*stats.moments, stats.activation_sq_sum]
        if stats.loss_grad_sum is not None:
            tensors.append(stats.loss_grad_sum)
        for tensor in tensors:
            staged = tensor.to(device)  # the tensor itself when already on `device`
            dist.broadcast(staged, src=src, group=group)
            if tensor.device != device:
                tensor.copy_(staged.to(tensor.device))


def _gather_inputs(result: CalibrationResult, group: Any) -> tuple[torch.Tensor | None, bool]:
    """All ranks' replay inputs in rank order, when every rank kept all of its inputs and they fit."""
    summary = (
        bool(result.inputs_complete and result.inputs is not None),
        0 if result.inputs is None else int(result.inputs.shape[0]),
    )
    summaries: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(summaries, summary, group=group)
    if not all(complete for complete, _ in summaries) or sum(count for _, count in summaries) > MAX_STORED_SAMPLES:
        return None, False
    assert result.inputs is not None
    home = result.inputs.device
    parts: list[Any] = [None] * len(summaries)
    dist.all_gather_object(parts, result.inputs.detach().cpu(), group=group)
    try:
        return torch.cat(parts).to(home), True
    except RuntimeError:  # ranks kept inputs of different shapes: nothing to replay as one tensor
        return None, False
