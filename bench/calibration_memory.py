"""Peak extra resident memory of ``Pruner.calibrate`` per sensitivity on a small Llama-style LM.

The model (hidden 256, 4 layers, 3.3M parameters, 28 scored layers) is built from a config with
random weights; one batch of ``--batch`` x ``--tokens`` token ids. The figure is the growth of the
process's peak resident set (``ru_maxrss``) during the call, so run each sensitivity in a fresh
process::

    for s in local loss output; do MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python bench/calibration_memory.py $s; done
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sensitivity", choices=("local", "loss", "output"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import transformers

    import ecp_fast

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = [torch.randint(0, 256, (args.batch, args.tokens)) for _ in range(args.batches)]
    with torch.no_grad():
        model(ids[0][:1, :8])  # load kernels and warm the allocator outside the measurement

    def loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))

    batches = [({"input_ids": x}, x) for x in ids] if args.sensitivity == "loss" else [{"input_ids": x} for x in ids]
    pruner = ecp_fast.Pruner(model, sensitivity=args.sensitivity, probes=8, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    pruner.calibrate(batches, loss_fn=loss if args.sensitivity == "loss" else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"{args.sensitivity}: peak extra RSS {peak:.1f} MiB, {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
