"""TokenButler: the learned token-importance predictor, its distillation and its checkpoints."""

from .checkpoint import PredictorError, load_checkpoint, save_checkpoint
from .network import PredictorConfig, TokenButlerPredictor

__all__ = ["PredictorConfig", "PredictorError", "TokenButlerPredictor", "load_checkpoint", "save_checkpoint"]
