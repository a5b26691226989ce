"""serving: the project's library.

It defines the CondInst network, its one post-processing implementation (automatic and
box-prompted), model files and their model card, image loading and transforms, the
``Segmenter`` API over every inference backend (PyTorch, ONNX Runtime, TensorRT),
visualisation and the command line.
``training``, ``export`` and ``app`` build on it; it never imports them.
"""

from .errors import BoxError, CheckpointError, ImageError, InputError, SimError
from .inference.images import load_image
from .model import CondInst, CondInstOutputs, build_condinst
from .model.card import Calibration, ModelCard, Provenance
from .model_config import InferenceConfig, ModelConfig
from .prediction import Prediction
from .segmenter import Segmenter

__all__ = [
    "BoxError",
    "Calibration",
    "CheckpointError",
    "CondInst",
    "CondInstOutputs",
    "ImageError",
    "InferenceConfig",
    "InputError",
    "ModelCard",
    "ModelConfig",
    "Prediction",
    "Provenance",
    "Segmenter",
    "SimError",
    "build_condinst",
    "load_image",
]
