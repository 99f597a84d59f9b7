"""Renamed keywords and names keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.pruning.calibration import Calibrator, resolve_layers
from ecp_fast.training import ECPPruneStep


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def test_pruner_criterion_keyword_is_sensitivity() -> None:
    with pytest.warns(DeprecationWarning, match="'criterion' was renamed to 'sensitivity'"):
        pruner = ecp_fast.Pruner(_model(), criterion="local")
    assert pruner.sensitivity == "local"


def test_prune_and_calibrator_accept_the_old_keyword() -> None:
    batches = [torch.randn(8, 4)]
    with pytest.warns(DeprecationWarning):
        report = ecp_fast.prune(_model(), batches, sparsity=0.5, criterion="local", progress=False)
    assert report.sensitivity == "local"
    model = _model()
    with pytest.warns(DeprecationWarning):
        calibrator = Calibrator(model, resolve_layers(model), criterion="local")
    assert calibrator.sensitivity == "local"


def test_both_old_and_new_keyword_is_an_error() -> None:
    with pytest.raises(TypeError, match="both 'criterion'"):
        ecp_fast.Pruner(_model(), criterion="local", sensitivity="output")


def test_iterative_criterion_is_prune_step_and_old_class_name_warns() -> None:
    import ecp_fast.training as training

    with pytest.warns(DeprecationWarning, match="ECPPruneStep"):
        old = training.ECPCriterion
    assert old is ECPPruneStep
    with pytest.warns(DeprecationWarning, match="'criterion' was renamed to 'prune_step'"):
        with pytest.raises(ValueError, match="prune_step"):
            ecp_fast.iterative_prune(
                _model(),
                [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))],
                nn.functional.cross_entropy,
                torch.optim.SGD(_model().parameters(), lr=0.1),
                lambda m: 1.0,
                0.0,
                interval=1,
                criterion="nope",
            )
