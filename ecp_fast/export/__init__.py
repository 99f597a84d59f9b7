"""Formats that make zeros pay: dense (masks folded), CSR (sparse Linear layers) and 2:4 (GPU).

- :func:`export` returns a plain torch copy of a pruned model in one of :data:`FORMATS`;
- :func:`save_compact` / :func:`load_compact` store only the nonzeros;
- :func:`export_semi_structured` converts 2:4-sparse Linear weights in place (CUDA).
"""

from ecp_fast.export.compact import COMPACT_FORMAT, load_compact, save_compact
from ecp_fast.export.csr import LayerChoice, choose_csr_layers, csr_linear, is_csr_linear, modelled_max_density
from ecp_fast.export.formats import FORMATS, copy_model, export, exported_layers, fold_masks
from ecp_fast.export.semi_structured import NMPatternError, check_n_m, export_semi_structured
from ecp_fast.export.timing import Timing, interleaved_times

__all__ = [
    "COMPACT_FORMAT",
    "FORMATS",
    "LayerChoice",
    "NMPatternError",
    "Timing",
    "check_n_m",
    "choose_csr_layers",
    "copy_model",
    "csr_linear",
    "export",
    "export_semi_structured",
    "exported_layers",
    "fold_masks",
    "interleaved_times",
    "is_csr_linear",
    "load_compact",
    "modelled_max_density",
    "save_compact",
]
