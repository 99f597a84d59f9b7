"""The reference against the mathematics of docs/method.md: sensitivities, and the exact non-linear check."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import ecp_fast
from ecp_fast.ops import reference


def small_tanh_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A 6-12-10-3 tanh MLP with random weights and a calibration batch, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    inputs = torch.randn(64, 6, dtype=torch.float64)
    return model, inputs


def test_sensitivities_are_jacobian_rows():
    model, inputs = small_tanh_mlp()
    grads = reference.sensitivities(model, inputs)
    assert set(grads) == {"0", "2", "4"}
    # For the last layer z = y, so every Jacobian row is a unit vector.
    assert torch.equal(grads["4"].g, torch.eye(3, dtype=torch.float64).unsqueeze(1).expand(3, 64, 3))
    # Middle layer: dy/dz = W4 diag(1 - tanh^2(z)) per sample.
    with torch.no_grad():
        z2 = model[2](model[1](model[0](inputs)))
        expected = model[4].weight.unsqueeze(1) * (1 - torch.tanh(z2).square()).unsqueeze(0)
    torch.testing.assert_close(grads["2"].g, expected)
    torch.testing.assert_close(grads["2"].x, torch.tanh(model[0](inputs)).detach())


def test_sensitivities_rejects_unknown_layers():
    model, inputs = small_tanh_mlp()
    with pytest.raises(ValueError, match="'1'"):
        reference.sensitivities(model, inputs, layers=["1"])


@pytest.mark.parametrize("layer", ["0", "2"])
def test_first_order_importance_ranks_like_exact_error(layer):
    """docs/method.md: on a small tanh MLP, I ranks weights like the exact compensated error."""
    model, inputs = small_tanh_mlp(seed=1)
    grads = reference.sensitivities(model, inputs, layers=[layer])[layer]
    weight = dict(model.named_modules())[layer].weight.detach()
    importance, bias_delta = ecp_fast.score(grads.x, grads.g, weight)
    exact = reference.exact_compensated_error(model, inputs, layer)
    correlation = spearmanr(importance.flatten().numpy(), exact.error.flatten().numpy()).statistic
    assert correlation >= 0.99, f"Spearman correlation {correlation:.4f} < 0.99"
    # Newton never reports an error above not compensating at all.
    assert (exact.error <= exact.error_uncompensated + 1e-12).all()
    # The first-order shift delta* captures the exact optimum: summed over the layer, the exact error
    # at delta* is within 5% of the exact minimum and below the uncompensated error.
    at_first_order = exact_error_at(model, inputs, layer, bias_delta)
    assert at_first_order.sum() <= 1.05 * exact.error.sum()
    assert at_first_order.sum() <= exact.error_uncompensated.sum()


def exact_error_at(model: nn.Module, inputs: torch.Tensor, layer: str, bias_delta: torch.Tensor) -> torch.Tensor:
    """Exact output error of removing each weight (i, j) while adding bias_delta[i, j] to b_i."""
    linear = dict(model.named_modules())[layer]
    errors = torch.zeros_like(bias_delta)
    with torch.no_grad():
        reference_output = model(inputs)
        for i, j in torch.cartesian_prod(*(torch.arange(s) for s in bias_delta.shape)).tolist():
            saved_weight, saved_bias = linear.weight[i, j].item(), linear.bias[i].item()
            linear.weight[i, j] = 0.0
            linear.bias[i] += bias_delta[i, j]
            errors[i, j] = (model(inputs) - reference_output).square().sum()
            linear.weight[i, j], linear.bias[i] = saved_weight, saved_bias
    return errors


def test_compensation_beats_no_compensation_on_exact_error():
    """Removing weights fed by nearly constant inputs costs far less with the bias shift."""
    model, inputs = small_tanh_mlp(seed=2)
    inputs = inputs + 2.0  # pushes the first tanh layer towards saturation: its outputs vary little
    exact = reference.exact_compensated_error(model, inputs, "2")
    assert exact.error.sum() < 0.5 * exact.error_uncompensated.sum()


def test_exact_error_rejects_non_linear_layers():
    model, inputs = small_tanh_mlp()
    with pytest.raises(ValueError, match="argument 'layer'"):
        reference.exact_compensated_error(model, inputs, "1")
