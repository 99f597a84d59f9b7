"""Bad arguments across the public API: refused naming the argument, the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.export import choose_csr_layers
from ecp_fast.pruning.calibration import merge_statistics
from ecp_fast.pruning.importance import IMPORTANCES
from ecp_fast.training import eligible_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"loss_fn": "ce"}, TypeError, r"argument 'loss_fn' must be a callable"),
        ({"output_fn": 3}, TypeError, r"argument 'output_fn' must be a callable"),
        ({"add_bias": "False"}, TypeError, r"argument 'add_bias' must be True or False, got 'False'"),
        ({"seed": "a"}, TypeError, r"argument 'seed' must be an integer"),
        ({"layers": 3}, TypeError, r"argument 'layers' must be a sequence of layer names, got 3"),
        ({"exclude": 3}, TypeError, r"argument 'exclude' must be a layer name, a glob pattern or a list"),
    ],
)
def test_prune_names_a_bad_argument_and_leaves_the_model(kwargs, error, message) -> None:
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(error, match=message):
        ecp_fast.prune(model, _batches(), 0.5, progress=False, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_register_importance_checks_its_arguments_and_keeps_the_librarys_methods() -> None:
    builtin = IMPORTANCES["ecp"]
    with pytest.raises(TypeError, match=r"argument 'name' must be a non-empty string, got None"):
        ecp_fast.register_importance(None, compensates=False, needs_calibration=False)  # type: ignore[arg-type]
    for name in ("ecp", "sparsegpt", "ecp-obs"):
        with pytest.raises(ValueError, match=rf"argument 'name' must not be a method of the library, got '{name}'"):
            ecp_fast.register_importance(name, compensates=False, needs_calibration=False)
    with pytest.raises(TypeError, match=r"argument 'compensates' must be a bool"):
        ecp_fast.register_importance("mine_for_test", compensates=1, needs_calibration=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"the decorated object must be a function"):
        ecp_fast.register_importance("mine_for_test", compensates=False, needs_calibration=False)(3)  # type: ignore[arg-type]
    assert IMPORTANCES["ecp"] is builtin and "mine_for_test" not in IMPORTANCES
    ecp_fast.prune(_model(), _batches(), 0.5, progress=False)  # the registry still works


def test_eligible_weights_takes_one_excluded_name_as_a_name() -> None:
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(3, 3))
    model.add_module("c", nn.Linear(3, 3))
    assert [ref.module_name for ref in eligible_weights(model, exclude="fc1")] == ["c"]


def test_merge_statistics_refuses_what_is_not_statistics() -> None:
    with pytest.raises(TypeError, match=r"argument 'b' must be LayerStatistics, got str"):
        merge_statistics(None, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'a' must be LayerStatistics or None, got str"):
        merge_statistics("x", "y")  # type: ignore[arg-type]


def test_choose_csr_layers_refuses_two_rules_at_once() -> None:
    with pytest.raises(ValueError, match=r"arguments 'max_density' and 'example_inputs' exclude each other"):
        choose_csr_layers(_model(), max_density=0.5, example_inputs=torch.randn(2, 4))


def test_functions_taking_a_model_name_it_when_given_something_else() -> None:
    from ecp_fast.export import export_semi_structured, exported_layers, fold_masks
    from ecp_fast.pruning.masks import copy_model
    from ecp_fast.pruning.structured import find_neuron_pairs

    functions = (ecp_fast.get_masks, copy_model, fold_masks, exported_layers, choose_csr_layers)
    for function in (*functions, find_neuron_pairs, eligible_weights, export_semi_structured):
        with pytest.raises(TypeError, match=r"argument 'model' must be a torch.nn.Module, got Tensor"):
            function(torch.randn(2, 2))


def test_a_wrong_state_is_named_by_the_decay_schedules() -> None:
    from ecp_fast.training import GammaSchedule, RelevanceDecay

    decay = RelevanceDecay(_model(), gamma=1e-4)
    with pytest.raises(
        ValueError, match=r"RelevanceDecay.load_state_dict: argument 'state' must be .* got dict without"
    ):
        decay.load_state_dict({})
    with pytest.raises(ValueError, match=r"GammaSchedule.load_state_dict: argument 'state' .* got NoneType"):
        GammaSchedule(1e-4).load_state_dict(None)  # type: ignore[arg-type]


def test_load_compact_names_a_bad_map_location(tmp_path) -> None:
    from ecp_fast.export import load_compact, save_compact

    path = tmp_path / "model.ecp"
    save_compact(_model(), path)
    with pytest.raises(ValueError, match=r"argument 'map_location' must name a device .* got 'foo'"):
        load_compact(path, _model(), map_location="foo")


def _nan_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = _batches()[0]
    inputs = inputs.clone()
    inputs[0, 0] = float("nan")
    return [(inputs, targets)]


def test_finetune_stops_at_a_non_finite_loss_and_restores_the_model() -> None:
    """A NaN input or loss made every weight NaN, silently."""
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"finetune: the loss of step 1 is NaN or Inf .* the model is restored"):
        ecp_fast.finetune(model, _nan_batches(), nn.functional.cross_entropy, steps=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match=r"finetune: argument 'loss_fn' must return a tensor, got str"):
        ecp_fast.finetune(model, _batches(), lambda outputs, targets: "loss", steps=1, progress=False)


def test_iterative_prune_stops_at_a_non_finite_loss_and_restores_the_model() -> None:
    from ecp_fast.training import iterative_prune

    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"iterative_prune: the loss of an optimizer step .* is NaN or Inf"):
        iterative_prune(
            model, _nan_batches(), nn.functional.cross_entropy, optimizer, lambda m: 1.0, bound=0.5, interval=2,
            max_steps=6, progress=False,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_iterative_prune_names_a_metric_that_is_no_number_and_keeps_the_models_mode() -> None:
    from ecp_fast.training import iterative_prune

    def run(model: nn.Module, metric) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        iterative_prune(
            model, _batches(), nn.functional.cross_entropy, optimizer, metric, bound=0.5, interval=2,
            max_steps=4, progress=False,
        )  # fmt: skip

    with pytest.raises(TypeError, match=r"argument 'metric_fn' must return a real number, got None"):
        run(_model(), lambda m: None)
    model = _model().train()
    model[1].eval()  # a mixed model gets exactly its modes back
    run(model, lambda m: torch.tensor(1.0))
    assert model.training and model[0].training and not model[1].training


def test_prune_sequential_names_inputs_the_first_block_does_not_take() -> None:
    blocks = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 4)))
    before = {name: tensor.clone() for name, tensor in blocks.state_dict().items()}
    with pytest.raises(ValueError, match=r"argument 'inputs': the first block does not run on the first batch"):
        ecp_fast.prune_sequential(blocks, [torch.randn(4, 7)], progress=False)
    assert all(torch.equal(before[k], v) for k, v in blocks.state_dict().items())


def test_training_and_export_helpers_refuse_what_they_cannot_use() -> None:
    from ecp_fast.export import modelled_max_density
    from ecp_fast.training import ECPPruneStep, RelevanceDecay, RelevanceDecayOptimizer

    model = _model()
    decay = RelevanceDecay(model, gamma=1e-4)
    with pytest.raises(TypeError, match=r"argument 'optimizer' must be a torch.optim.Optimizer, got NoneType"):
        RelevanceDecayOptimizer(None, decay)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'decay' must be a RelevanceDecay, got str"):
        RelevanceDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "decay")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method 'taylor' needs loss gradients: argument 'loss_fn' is required"):
        ECPPruneStep(_batches(), method="taylor", sensitivity="output")
    for bad in (-1, True, float("nan")):
        with pytest.raises(ValueError, match=r"argument 'out_features' must be a non-negative integer"):
            modelled_max_density(bad, 10)  # type: ignore[arg-type]
    assert modelled_max_density(300, 784) > 0


def test_check_n_m_and_interleaved_times_name_bad_arguments() -> None:
    from ecp_fast.export import check_n_m, interleaved_times

    with pytest.raises(TypeError, match=r"argument 'weight' must be a tensor, got NoneType"):
        check_n_m(None)  # type: ignore[arg-type]
    check_n_m(torch.zeros(0, 8))  # no group: nothing to refuse
    with pytest.raises(TypeError, match=r"argument 'calls' must map names to zero-argument callables"):
        interleaved_times([lambda: 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"argument 'rounds' must be an integer of at least 1, got 1.5"):
        interleaved_times({"a": lambda: 1}, rounds=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"argument 'burst_seconds' must be a positive number of seconds, got -1"):
        interleaved_times({"a": lambda: 1}, burst_seconds=-1)
    with pytest.raises(ValueError, match=r"argument 'setup' names contenders that are not in 'calls': \['b'\]"):
        interleaved_times({"a": lambda: 1}, setup={"b": lambda: 1})
