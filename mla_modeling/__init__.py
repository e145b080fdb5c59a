"""Remote-code model files copied into every export (self-contained: torch + transformers only)."""

from .configuration_mla import MLAConfig
from .modeling_mla import MLAForCausalLM, MLAModel

__all__ = ["MLAConfig", "MLAModel", "MLAForCausalLM"]
