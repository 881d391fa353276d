"""Hugging Face directories in and out: read a directory's config and tensors, pick its
converter from the registry (interop/hf_registry.py), build the Velocis model; export writes
config.json, model.safetensors, generation_config.json and the tokenizer.

Converters: hf_dense.py (Llama, Mistral, Qwen2, Qwen3), hf_moe.py (Mixtral, Qwen3-MoE),
hf_deepseek.py (DeepSeek-V3, V3.2), hf_qwen3_next.py (Qwen3-Next), hf_mamba2.py (Mamba-2); a new architecture adds a module that registers itself and one
import line below.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from velocis.errors import VelocisError
from velocis.interop import hf_deepseek, hf_dense, hf_moe  # noqa: F401  (each registers its architectures)
from velocis.interop import hf_qwen3_next  # noqa: F401  (Qwen3-Next: Gated DeltaNet + gated attention + MoE)
from velocis.interop import hf_mamba2  # noqa: F401  (Mamba-2: SSD mixers, no feed-forward)
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors

# --------------------------------------------------------------------------- reading / writing dirs
def read_hf_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VelocisError(f"{path}: no config.json; pass a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise VelocisError(f"{f}: not valid JSON ({e})") from None


# a config.json without "architectures" (e.g. PretrainedConfig.save_pretrained) names its model_type only
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
               "qwen3_next": "Qwen3NextForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def converter_for(hf: dict[str, Any], where: str | Path = "") -> tuple[str, Converter]:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(hf.get("model_type"))
    if arch not in HF_ARCHITECTURES:
        raise VelocisError(
            f"{where}: architecture {arch or hf.get('model_type') or 'unknown'!s} is not supported; "
            f"Velocis imports {', '.join(sorted(HF_ARCHITECTURES))}")
    return arch, HF_ARCHITECTURES[arch]


def read_hf_tensors(path: str | Path) -> Tensors:
    """All tensors of an HF dir: model.safetensors, a sharded index, or pytorch_model.bin."""
    from velocis.model_io import read_safetensors
    from velocis.utils.output_dir import as_path

    path = as_path(path, "path")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VelocisError(f"{index} is truncated or corrupt ({type(e).__name__}: {e}); "
                               f"re-download it") from None
        out: Tensors = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise VelocisError(f"{path}: shard {shard} listed in model.safetensors.index.json is missing")
            out.update(read_safetensors(path / shard))
        return out
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, or objects beyond tensors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VelocisError(f"{path / 'pytorch_model.bin'} is truncated or corrupt, or not a plain state dict "
                               f"({first}); re-save or re-download it") from None
    raise VelocisError(f"{path}: no model.safetensors (or sharded index / pytorch_model.bin) found")


def load_hf(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """HF directory -> (VelocisModel, tokenizer or None)."""
    from velocis.model_io import build_model, load_tokenizer

    hf = read_hf_config(path)
    arch, conv = converter_for(hf, path)
    cfg = conv.config_from_hf(hf)
    sd = conv.weights_from_hf(read_hf_tensors(path), cfg)
    model = build_model(cfg, sd, where=f"{path} ({arch})", device=device, dtype=dtype)
    return model, load_tokenizer(path)


# All that export_hf writes, so all it may replace in an existing output directory.
HF_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> str:
    """Write `model` as an HF directory transformers loads; returns the architecture name.

    Only HF_FILES are written, each atomically; a directory holding anything else is refused
    unless `overwrite` (see velocis.utils.output_dir), and nothing else in it is ever deleted.
    """
    from safetensors.torch import save_file

    from velocis.model_io import require_dtype, require_model
    from velocis.utils.atomic import atomic_files
    from velocis.utils.output_dir import as_path, check_output_dir, config_kind

    out_dir = as_path(out_dir, "out_dir")
    require_model(model)
    require_dtype(dtype)
    cfg = model.config
    if getattr(cfg, "quantization", None):
        raise VelocisError("this model is quantized (velocis quantize); transformers cannot read its packed "
                           "weights: export the model it was quantized from")
    for arch, conv in HF_ARCHITECTURES.items():
        if conv.config_to_hf and conv.can_export and conv.can_export(cfg):
            break
    else:
        raise VelocisError("no Hugging Face architecture matches this model (its mixers/feed-forwards have no "
                           f"HF exporter; exportable: {', '.join(a for a, c in HF_ARCHITECTURES.items() if c.config_to_hf)})")
    previous = check_output_dir(out_dir, HF_FILES, "a Hugging Face model", overwrite, flag="out_dir",
                                is_own=lambda d: config_kind(d) == "hf")  # a previous export, not a Velocis dir
    hf_cfg = conv.config_to_hf(cfg)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    tensors = conv.weights_to_hf(sd, cfg)
    store_dtype = next(iter(tensors.values())).dtype
    hf_cfg.setdefault("dtype", str(store_dtype).removeprefix("torch."))
    need = sum(v.numel() * v.element_size() for v in tensors.values())
    with atomic_files(out_dir, replace=previous, need_bytes=need) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return arch
