"""Running a test module's ranks: processes spawned on loopback (gloo, file:// rendezvous)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def spawn_ranks(rank_main: Callable[..., None], workdir: Path, world_size: int = WORLD_SIZE) -> list[Any]:
    """Run ``rank_main(rank, world_size, init_file, workdir)`` in ``world_size`` processes; returns what
    each rank saved to ``workdir/rank<r>.pt``, in rank order."""
    init_file = workdir / "rendezvous"
    mp.spawn(rank_main, args=(world_size, str(init_file), str(workdir)), nprocs=world_size, join=True)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
