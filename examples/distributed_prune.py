"""Data-parallel ECP calibration with torch.distributed: each rank calibrates on its shard.

Run on one machine with two processes (gloo on CPU, nccl when every rank has a GPU)::

    torchrun --nproc_per_node=2 examples/distributed_prune.py
    torchrun --nproc_per_node=2 examples/distributed_prune.py --mode sequential

Run without torchrun it is an ordinary single-process job. Every rank starts from the same weights
(same seed, then broadcast from rank 0 for good measure), calibrates on its own share of the
batches, merges the statistics with ``synchronize_calibration`` and prunes; rank 0 then checks that
every rank holds the same masks and biases and reports how much the output moved against a dense copy.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from ecp_fast import Pruner, get_masks
from ecp_fast.distributed import broadcast_module, per_rank_probe_seed, shard, synchronize_calibration
from ecp_fast.pruning.sequential import prune_sequential

logger = logging.getLogger("distributed_prune")


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def make_data(width: int, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Calibration batches, identical on every rank (same seed); each rank then keeps its shard."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, width, generator=generator) for _ in range(batches)]


def fingerprint(model: nn.Module) -> str:
    """A hash of every mask and every Linear bias: equal strings mean bit-identical pruning."""
    digest = hashlib.sha256()
    for name, mask in sorted(get_masks(model).items()):
        digest.update(name.encode())
        digest.update(mask.cpu().numpy().tobytes())
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            digest.update(module.bias.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def output_change(pruned: nn.Module, dense: nn.Module, data: list[torch.Tensor], device: torch.device) -> float:
    """``||y_pruned - y_dense|| / ||y_dense||`` over all batches: what ECP keeps small."""
    pruned.eval()
    dense.eval()
    with torch.no_grad():
        change = sum(float((pruned(x.to(device)) - dense(x.to(device))).square().sum()) for x in data)
        norm = sum(float(dense(x.to(device)).square().sum()) for x in data)
    return (change / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pruner", "sequential"), default="pruner")
    parser.add_argument("--sensitivity", choices=("output", "local"), default="output")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if rank != 0:
        logging.getLogger("ecp_fast").setLevel(logging.WARNING)

    torch.manual_seed(args.seed)  # the same initial weights everywhere ...
    model = nn.Sequential(*[MLPBlock(args.width) for _ in range(args.blocks)]).to(device)
    broadcast_module(model)  # ... and made certain by copying rank 0's
    dense = copy.deepcopy(model)
    data = make_data(args.width, args.batches, args.batch_size, seed=args.seed + 1)
    my_batches = list(shard(data))  # batches rank, rank + world_size, ...
    logger.info("rank %d of %d calibrates on %d of %d batches", rank, world_size, len(my_batches), len(data))

    if args.mode == "pruner":
        pruner = Pruner(model, sensitivity=args.sensitivity, seed=args.seed, progress=False)
        with per_rank_probe_seed(pruner):  # independent probes per rank; prune() sees the common seed
            pruner.calibrate(my_batches)
        pruner.calibration = synchronize_calibration(pruner.calibration)
        report = pruner.prune(sparsity=args.sparsity, method="ecp", scope="global")
    else:
        report = prune_sequential(  # merges every block's statistics across ranks before pruning it
            model,
            my_batches,
            sparsity=args.sparsity,
            method="ecp",
            sensitivity=args.sensitivity,
            scope="layer",
            seed=args.seed,
            progress=False,
        )

    prints = [fingerprint(model)]
    if distributed:
        prints = [None] * world_size
        dist.all_gather_object(prints, fingerprint(model))
    if rank == 0:
        logger.info(
            "sparsity %.4f; masks and biases identical on all %d ranks: %s",
            report.sparsity,
            world_size,
            len(set(prints)) == 1,
        )
        logger.info(
            "relative change of the model output on all batches: %.4f", output_change(model, dense, data, device)
        )
    if distributed:
        identical = len(set(prints)) == 1
        dist.destroy_process_group()
        if not identical:
            raise SystemExit("ranks disagree on the pruned model")


if __name__ == "__main__":
    main()
