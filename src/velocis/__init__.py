"""Velocis: a full-stack LLM framework (tokenizer, data, models, training, inference)."""
from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError

__version__ = "0.1.0"

__all__ = ["ModelConfig", "get_preset", "VelocisError", "load", "generate", "__version__"]


def __getattr__(name):  # lazy: keep `import velocis` light
    if name in ("load", "generate"):
        from velocis import api

        return getattr(api, name)
    raise AttributeError(f"module 'velocis' has no attribute {name!r}")
