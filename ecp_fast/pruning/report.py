"""What a pruning call did, per layer and overall; ``str(report)`` is a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One layer after pruning."""

    name: str
    kind: str
    weights: int
    pruned: int
    bias_change_l1: float  # sum_i |b_i(after) - b_i(before)|
    bias_added: bool

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's weights that are zero by mask."""
        return self.pruned / self.weights if self.weights else 0.0


@dataclass
class PruneReport:
    """What :meth:`Pruner.prune` did, per layer and overall; ``str(report)`` is a table."""

    method: str
    scope: str
    sensitivity: str
    target_sparsity: float
    steps: int
    layers: list[LayerReport] = field(default_factory=list)
    allocation: str | None = None  # how the total was split across layers (reconstructive pruning)
    candidate: str | None = None  # the split the allocation search chose
    divergences: dict[str, float] = field(default_factory=dict)  # every searched candidate's divergence

    @property
    def total_weights(self) -> int:
        """Weights in the scored layers."""
        return sum(layer.weights for layer in self.layers)

    @property
    def total_pruned(self) -> int:
        """Weights removed (masked) in the scored layers."""
        return sum(layer.pruned for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the scored layers."""
        return self.total_pruned / self.total_weights if self.total_weights else 0.0

    @property
    def added_biases(self) -> list[str]:
        """Layers that had no bias and received one for the compensation."""
        return [layer.name for layer in self.layers if layer.bias_added]

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per layer, for CSV or logging."""
        return [
            {
                "layer": layer.name,
                "kind": layer.kind,
                "weights": layer.weights,
                "pruned": layer.pruned,
                "sparsity": layer.sparsity,
                "bias_change_l1": layer.bias_change_l1,
                "bias_added": layer.bias_added,
            }
            for layer in self.layers
        ]

    def __str__(self) -> str:
        header = (
            f"method={self.method} scope={self.scope} sensitivity={self.sensitivity} steps={self.steps} "
            f"target={self.target_sparsity:.4g} achieved={self.sparsity:.4f}"
        )
        name_width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        if self.allocation is not None:
            header += f" allocation={self.allocation}" + (f" ({self.candidate})" if self.candidate else "")
        lines = [
            header,
            f"{'layer':<{name_width}}  {'kind':<6}  {'weights':>9}  {'pruned':>9}  {'sparsity':>8}  "
            f"{'sum|db|':>10}  bias added",
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{name_width}}  {layer.kind:<6}  {layer.weights:>9}  {layer.pruned:>9}  "
                f"{layer.sparsity:>8.4f}  {layer.bias_change_l1:>10.4g}  {'yes' if layer.bias_added else 'no'}"
            )
        lines.append(
            f"{'total':<{name_width}}  {'':<6}  {self.total_weights:>9}  {self.total_pruned:>9}  {self.sparsity:>8.4f}"
        )
        if self.divergences:
            searched = ", ".join(f"{label} {value:.4g}" for label, value in self.divergences.items())
            lines.append(f"allocation search (calibration divergence): {searched}")
        return "\n".join(lines)
