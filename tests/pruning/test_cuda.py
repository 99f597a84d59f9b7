"""The pruner on a CUDA model against the same prune on CPU (runs only where a CUDA GPU is present).

On CUDA the calibration sums go through the Triton kernels (``ecp::moments``, ``ecp::score``,
``ecp::gram``) and the OBS solver through cuSOLVER; on CPU through the native kernels and LAPACK.
Both sum in float32 in different orders, so weights whose importances lie within rounding of the
threshold may fall either way: the masks must agree almost everywhere, not bit for bit, and the
pruned models must be equally good on the calibration data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import ecp_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = ["magnitude", "wanda", "ecp", "sparsegpt", "ecp-obs"]


def data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight batches of a 3-class problem that a small MLP learns in a few hundred steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 40, generator=generator) * 2.0
    batches = []
    for _ in range(8):
        y = torch.randint(0, 3, (64,), generator=generator)
        batches.append((centres[y] + torch.randn(64, 40, generator=generator), y))
    return batches


def trained_mlp(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(model(x.to(device)), y.to(device))) for x, y in batches)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.cpu().bool() for name, buffer in model.named_buffers() if name.endswith("weight_mask")}


def assert_masks_agree(cpu_model: nn.Module, cuda_model: nn.Module, cpu_report, cuda_report) -> None:
    """The same kept count, and at most 2% of the mask entries different (rounding near the threshold).
    Where an allocation search chose differently on the two devices (a split, or sweep against
    importance masks), that must be a near-tie (the CUDA choice within 1% of the CPU's, or 1e-12, as
    measured on CPU), and then the masks may differ more."""
    cpu_masks, cuda_masks = masks(cpu_model), masks(cuda_model)
    assert cpu_masks.keys() == cuda_masks.keys()
    assert sum(int(m.sum()) for m in cuda_masks.values()) == sum(int(m.sum()) for m in cpu_masks.values())
    if cpu_report.candidate != cuda_report.candidate:
        # Compare like with like on CPU: the final labels where CPU ran both, else the splits searched.
        divergences, chosen, other = cpu_report.divergences, cpu_report.candidate, cuda_report.candidate
        if other not in divergences:
            chosen, other = chosen.split(",")[0], other.split(",")[0]
        assert divergences[other] <= divergences[chosen] * 1.01 + 1e-12, (chosen, other, divergences)
        return
    differing = sum(int((cpu_masks[n] != cuda_masks[n]).sum()) for n in cpu_masks)
    assert differing <= 0.02 * sum(m.numel() for m in cpu_masks.values()), differing


@pytest.fixture(autouse=True)
def ieee_float32() -> Iterator[None]:
    """Full float32 matrix products on CUDA, as on CPU (TF32 would loosen every comparison below)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("method", METHODS)
def test_cuda_prune_agrees_with_cpu(method: str) -> None:
    batches = data()
    dense = trained_mlp(batches)
    on_cpu, on_cuda = copy.deepcopy(dense), copy.deepcopy(dense).cuda()
    loss_fn = nn.functional.cross_entropy
    cpu_report = ecp_fast.prune(on_cpu, batches, sparsity=0.7, method=method, loss_fn=loss_fn, progress=False)
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    cuda_report = ecp_fast.prune(on_cuda, cuda_batches, sparsity=0.7, method=method, loss_fn=loss_fn, progress=False)

    assert all(p.is_cuda for p in on_cuda.parameters()) and all(b.is_cuda for b in on_cuda.buffers())
    assert cuda_report.sparsity == pytest.approx(cpu_report.sparsity)
    assert_masks_agree(on_cpu, on_cuda, cpu_report, cuda_report)
    cpu_loss, cuda_loss = loss(on_cpu, batches, "cpu"), loss(on_cuda, batches, "cuda")
    assert cuda_loss == pytest.approx(cpu_loss, rel=0.05), (method, cpu_loss, cuda_loss)


def test_cuda_two_four_prune_exports_and_runs() -> None:
    """A 2:4 prune on CUDA in half precision exports to semi-structured weights that compute the same."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparse kernels need compute capability 8.0+")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().half().eval()
    batches = [torch.randn(128, 256, device="cuda", dtype=torch.float16) for _ in range(4)]
    ecp_fast.prune(model, batches, sparsity=0.5, method="wanda", scope="2:4", progress=False)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        exported = ecp_fast.export.export(model, "2:4")
        got = exported(x)
    assert type(exported[0].weight).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def conv_data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four batches of 8x8 two-channel images whose class is the brighter quadrant."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        x = torch.rand(32, 2, 8, 8, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        for i, label in enumerate(y.tolist()):
            row, col = divmod(label, 2)
            x[i, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 1.0
        batches.append((x, y))
    return batches


def test_cuda_conv_reconstruction_agrees_with_cpu() -> None:
    """ecp-obs on a CNN: Conv2d unfolded into the Gram op on CUDA, the same split and masks as on CPU."""
    batches = conv_data()
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 64, 4),
    ).eval()  # fmt: skip
    on_cpu, on_cuda = copy.deepcopy(dense), copy.deepcopy(dense).cuda()
    loss_fn = nn.functional.cross_entropy
    cpu_report = ecp_fast.prune(on_cpu, batches, sparsity=0.6, method="ecp-obs", loss_fn=loss_fn, progress=False)
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    cuda_report = ecp_fast.prune(on_cuda, cuda_batches, sparsity=0.6, method="ecp-obs", loss_fn=loss_fn, progress=False)
    assert_masks_agree(on_cpu, on_cuda, cpu_report, cuda_report)
    assert loss(on_cuda, batches, "cuda") == pytest.approx(loss(on_cpu, batches, "cpu"), rel=0.05)


def test_cuda_sequential_streams_blocks_through_the_gpu() -> None:
    """prune_sequential(device="cuda") on blocks kept on CPU: the blocks come back to CPU, pruned as on CPU."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3)]
    on_cpu, streamed = copy.deepcopy(blocks), copy.deepcopy(blocks)
    inputs = [torch.randn(64, 32) for _ in range(4)]
    ecp_fast.prune_sequential(on_cpu, inputs, sparsity=0.5, method="wanda", progress=False)
    ecp_fast.prune_sequential(streamed, inputs, sparsity=0.5, method="wanda", device="cuda", progress=False)
    assert all(p.device.type == "cpu" for block in streamed for p in block.parameters())
    for cpu_block, cuda_block in zip(on_cpu, streamed, strict=True):
        cpu_masks, cuda_masks = masks(cpu_block), masks(cuda_block)
        differing = sum(int((cpu_masks[n] != cuda_masks[n]).sum()) for n in cpu_masks)
        assert differing <= 0.02 * sum(m.numel() for m in cpu_masks.values()), differing


def test_cuda_neuron_pruning_shrinks_the_model_on_the_gpu() -> None:
    """prune_neurons on CUDA: the same number of neurons removed as on CPU, a smaller model that runs there."""
    batches = data()
    dense = trained_mlp(batches)
    on_cpu, on_cuda = copy.deepcopy(dense), copy.deepcopy(dense).cuda()
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    cpu_report = ecp_fast.prune_neurons(on_cpu, 0.5, batches=batches, loss_fn=nn.functional.cross_entropy)
    cuda_report = ecp_fast.prune_neurons(on_cuda, 0.5, batches=cuda_batches, loss_fn=nn.functional.cross_entropy)
    cuda_model = cuda_report.model
    assert [m.out_features for m in cuda_model if isinstance(m, nn.Linear)] == [
        m.out_features for m in cpu_report.model if isinstance(m, nn.Linear)
    ]
    assert all(p.is_cuda for p in cuda_model.parameters())
    assert loss(cuda_model, batches, "cuda") == pytest.approx(loss(cpu_report.model, batches, "cpu"), rel=0.1)
