"""uot-asr: unbalanced-optimal-transport knowledge transfer from a pretrained language model into CTC ASR."""

from .costs import cosine_cost
from .diagnostics import AlignmentDiagnostics, alignment_diagnostics
from .solver import UOTResult, fraction_from_rho, rho_from_fraction, solve_uot, temporal_order_penalty

__version__ = "0.1.0.dev0"

__all__ = [
    "AlignmentDiagnostics",
    "UOTResult",
    "alignment_diagnostics",
    "cosine_cost",
    "fraction_from_rho",
    "rho_from_fraction",
    "solve_uot",
    "temporal_order_penalty",
]
