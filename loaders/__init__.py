"""Files and composition: safetensors, key maps, checkpoints, tokenizers, the Hub, the built-in model, and the
pipeline that puts them together (`from loaders import Pipeline`)."""

from loaders.pipeline import Pipeline, Result

__all__ = ["Pipeline", "Result"]
