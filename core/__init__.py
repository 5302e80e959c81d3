"""moebits core: the shared vocabulary (pure Python + numpy).

ExpertKey names one expert, the Precision registry says how many bytes a weight format costs,
ModelSpec presets give the real shapes of public MoE models. Nothing here imports torch,
simpy or hydra.
"""

from moebits.core.keys import ExpertKey
from moebits.core.model_spec import MODEL_PRESETS, ModelSpec, get_model_spec
from moebits.core.precision import PRECISIONS, Precision, get_precision

__all__ = [
    "ExpertKey",
    "MODEL_PRESETS",
    "ModelSpec",
    "PRECISIONS",
    "Precision",
    "get_model_spec",
    "get_precision",
]
