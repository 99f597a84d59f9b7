"""``shard`` on streams of unknown length (docs/scale.md): generators and DataLoaders over an
IterableDataset, sharded and calibrated on (without a progress total), in one process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ecp_fast import Pruner
from ecp_fast.distributed import shard
from ecp_fast.pruning.calibration import Calibrator

BATCHES = 4
BATCH_SIZE = 16


class Stream(IterableDataset):
    """Samples of unknown length: a DataLoader over it has a ``__len__`` that raises TypeError."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(8, generator=generator) for _ in range(BATCHES * BATCH_SIZE))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches() -> list[torch.Tensor]:
    return list(DataLoader(Stream(), batch_size=BATCH_SIZE))


def calibrated(items: object, progress: bool = False) -> Pruner:
    torch.set_num_threads(1)
    pruner = Pruner(make_model(), sensitivity="local", progress=progress)
    pruner.calibrate(items)  # type: ignore[arg-type]
    return pruner


def assert_same_statistics(first: Pruner, second: Pruner) -> None:
    assert first.calibration is not None and second.calibration is not None
    assert first.calibration.samples == second.calibration.samples == BATCHES * BATCH_SIZE
    assert first.calibration.batches == second.calibration.batches == BATCHES
    for name, stats in first.statistics.items():
        for got, expected in zip(stats.moments, second.statistics[name].moments, strict=True):
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("progress", [False, True])
def test_pruner_calibrates_on_a_shard_of_a_generator(progress: bool) -> None:
    stream = (batch for batch in batches())  # a generator: no length
    assert_same_statistics(calibrated(shard(stream), progress), calibrated(batches()))


@pytest.mark.parametrize("progress", [False, True])
def test_pruner_calibrates_on_a_shard_of_an_iterable_dataloader(progress: bool) -> None:
    loader = DataLoader(Stream(), batch_size=BATCH_SIZE)
    assert_same_statistics(calibrated(shard(loader), progress), calibrated(batches()))
    pruner = calibrated(shard(loader))
    pruner.prune(0.5, method="ecp", scope="layer")  # a re-iterable shard of a stream prunes too


def test_calibrator_runs_on_a_stream_without_a_total() -> None:
    torch.set_num_threads(1)
    model = make_model()
    pruner = Pruner(model, sensitivity="local", progress=False)
    calibrator = Calibrator(model, pruner.layers, "local")
    result = calibrator.run(shard(DataLoader(Stream(), batch_size=BATCH_SIZE)), progress=True)
    assert result.batches == BATCHES and result.samples == BATCHES * BATCH_SIZE


def test_shard_of_an_iterable_dataloader_deals_out_its_batches() -> None:
    loader = DataLoader(Stream(), batch_size=BATCH_SIZE)
    parts = [shard(loader, rank=rank, world_size=2) for rank in range(2)]
    expected = batches()
    for rank, part in enumerate(parts):
        got = list(part)
        assert len(got) == BATCHES // 2
        for batch, wanted in zip(got, expected[rank::2], strict=True):
            assert torch.equal(batch, wanted)
        assert [batch.shape for batch in part] == [batch.shape for batch in got]  # re-iterable
        with pytest.raises(TypeError, match=r"this Shard has no length: its items \(DataLoader\) have none"):
            len(part)
    # a stream of unknown length is not checked for enough batches, one with a length still is
    assert list(shard(DataLoader(Stream(), batch_size=BATCHES * BATCH_SIZE), rank=1, world_size=2)) == []
    with pytest.raises(ValueError, match="at least one"):
        shard(batches()[:1], rank=0, world_size=2)
