"""Velocis: a full-stack LLM framework (tokenizer, data, models, training, inference)."""
from velocis.errors import VelocisError

__version__ = "0.1.0"

__all__ = ["ModelConfig", "get_preset", "VelocisError", "load", "generate", "__version__"]


def __getattr__(name):  # lazy: `import velocis` (and the tokenizer workers of data prepare) never load torch
    if name in ("load", "generate"):
        from velocis import api

        return getattr(api, name)
    if name in ("ModelConfig", "get_preset"):
        from velocis import config

        return getattr(config, name)
    raise AttributeError(f"module 'velocis' has no attribute {name!r}")
