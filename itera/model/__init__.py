"""The Llama-family decoder (:mod:`itera.model.llama`), its config and checkpoint I/O."""

from itera.model.config import ModelConfig

__all__ = ["ModelConfig"]
