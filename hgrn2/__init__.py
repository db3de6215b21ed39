"""HGRN2 language models: configuration, presets, model, recurrent inference, checkpoints."""

from hgrn2.checkpoint import load_checkpoint, save_checkpoint
from hgrn2.config import PRESETS, HGRN2Config, param_count, preset
from hgrn2.model import HGRN2LM

__all__ = ["HGRN2Config", "HGRN2LM", "PRESETS", "load_checkpoint", "param_count", "preset", "save_checkpoint"]
