"""uot-asr: unbalanced-optimal-transport knowledge transfer from a pretrained language model into CTC ASR.

Importing the package registers the model with `AutoConfig`, `AutoModel` and `AutoModelForCTC`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCTC

from .configuration_wav2vec2_uot import Wav2Vec2UOTConfig
from .costs import cosine_cost
from .diagnostics import AlignmentDiagnostics, alignment_diagnostics
from .modeling_wav2vec2_uot import Wav2Vec2ForCTCWithUOT, Wav2Vec2UOTModel, Wav2Vec2UOTOutput
from .solver import (
    ALIGNERS,
    UOTResult,
    fraction_from_rho,
    register_aligner,
    rho_from_fraction,
    solve_ot,
    solve_uot,
    temporal_order_penalty,
)

__version__ = "0.1.0.dev0"

AutoConfig.register(Wav2Vec2UOTConfig.model_type, Wav2Vec2UOTConfig, exist_ok=True)
AutoModel.register(Wav2Vec2UOTConfig, Wav2Vec2UOTModel, exist_ok=True)
AutoModelForCTC.register(Wav2Vec2UOTConfig, Wav2Vec2ForCTCWithUOT, exist_ok=True)

__all__ = [
    "ALIGNERS",
    "AlignmentDiagnostics",
    "UOTResult",
    "Wav2Vec2ForCTCWithUOT",
    "Wav2Vec2UOTConfig",
    "Wav2Vec2UOTModel",
    "Wav2Vec2UOTOutput",
    "alignment_diagnostics",
    "cosine_cost",
    "fraction_from_rho",
    "register_aligner",
    "rho_from_fraction",
    "solve_ot",
    "solve_uot",
    "temporal_order_penalty",
]
