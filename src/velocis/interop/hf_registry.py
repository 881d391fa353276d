"""The Hugging Face architecture registry: `HF_ARCHITECTURES` maps an HF `config.json`
`architectures[0]` to a `Converter`, how its config and tensors become Velocis's (and back, for
export). Converter modules (hf_dense.py, hf_moe.py, hf_deepseek.py) register into it on import;
interop/hf.py imports them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from velocis.config import ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class Converter:
    """One HF architecture. `config_from_hf(hf_config_dict) -> ModelConfig`;
    `weights_from_hf(hf_tensors, config) -> velocis state dict` (may pop from its input);
    for export: `config_to_hf(config) -> hf config dict` (with "architectures" and "model_type"),
    `weights_to_hf(velocis_state, config) -> hf tensors`, and `can_export(config) -> bool`
    (the first registered converter that accepts a config is used by `velocis export`)."""

    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    weights_from_hf: Callable[[Tensors, ModelConfig], Tensors]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] | None = None
    weights_to_hf: Callable[[Tensors, ModelConfig], Tensors] | None = None
    can_export: Callable[[ModelConfig], bool] | None = None


HF_ARCHITECTURES: dict[str, Converter] = {}
