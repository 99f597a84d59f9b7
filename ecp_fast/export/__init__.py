"""Formats that make zeros pay: semi-structured (2:4) sparse weights for GPUs that support them."""

from ecp_fast.export.semi_structured import NMPatternError, check_n_m, export_semi_structured

__all__ = ["NMPatternError", "check_n_m", "export_semi_structured"]
