"""Model directories: `model.safetensors` + `config.json` (+ tokenizer files).

    save_model(model, tokenizer, out_dir)     # writes only those files, each atomically
    model, tok = load_model_dir(dir)          # a Velocis dir or a training run dir (same layout)

`velocis.load` (api.py) also accepts Hugging Face directories via velocis.interop.hf.
A tied lm_head is stored once (as embed_tokens.weight).
A quantized model (`velocis quantize`; config.json has `quantization`) is the same layout: its
quantized modules store qweight / scales / zeros instead of weight (velocis/quant/formats.py), and
loading builds them as velocis.quant modules on the meta device before the state dict is assigned.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # Tokenizer.save
MODEL_FILES = (WEIGHTS, CONFIG, *TOKENIZER_FILES)  # all that save_model writes, so all it may replace


def require_model(model, param: str = "model") -> None:
    """A clear error for a wrong argument instead of an AttributeError deep inside."""
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise VelocisError(f"{param} must be a VelocisModel, got {type(model).__name__}")


def require_dtype(dtype, param: str = "dtype") -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise VelocisError(f"{param} must be a floating torch.dtype such as torch.bfloat16, or None to keep "
                           f"the stored precision; got {dtype!r}")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; a damaged file is reported as such, not as a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as e:
        raise VelocisError(f"{file} is truncated or corrupt ({e}); re-save or re-download it") from None


def model_state(model) -> dict[str, torch.Tensor]:
    """state_dict without the duplicate tied head, contiguous, on CPU."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
               overwrite: bool = False) -> Path:
    """Write a Velocis model directory: model.safetensors + config.json (+ tokenizer files).

    Only those files are written, each atomically (output_dir.check_output_dir says where we may):
    a directory holding anything else (a training run, another model, other files) is refused
    unless `overwrite`, and even then nothing but those files is replaced.
    """
    from safetensors.torch import save_file

    from velocis.utils.atomic import atomic_files
    from velocis.utils.output_dir import as_path, check_output_dir

    out_dir = as_path(out_dir, "out_dir")
    require_model(model)
    require_dtype(dtype)
    if tokenizer is not None and not hasattr(tokenizer, "save"):
        raise VelocisError(f"tokenizer must be a velocis Tokenizer or None, got {type(tokenizer).__name__}")
    previous = check_output_dir(out_dir, MODEL_FILES, "a Velocis model", overwrite, flag="out_dir",
                                is_own=is_velocis_dir)
    sd = model_state(model)
    if dtype is not None:  # a quantized model's scales keep their format's dtype (float16)
        fixed = (lambda k: k.endswith(".scales")) if model.config.quantization is not None else (lambda k: False)
        sd = {k: v.to(dtype) if v.is_floating_point() and not fixed(k) else v for k, v in sd.items()}
    cfg = model.config
    if tokenizer is not None:  # the model's special ids follow its tokenizer
        for name in ("bos", "eos", "pad"):
            tid = getattr(tokenizer, f"{name}_id", None)
            if tid is not None and getattr(cfg, f"{name}_token_id") is None:
                cfg = cfg.replace(**{f"{name}_token_id": tid})
    need = sum(v.numel() * v.element_size() for v in sd.values())
    with atomic_files(out_dir, replace=previous, need_bytes=need) as tmp:
        save_file(sd, tmp / WEIGHTS, metadata={"format": "pt", "velocis": "1"})
        (tmp / CONFIG).write_text(cfg.to_json() + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str = "", device="cpu",
                dtype: torch.dtype | None = None):
    """A VelocisModel with exactly `state`'s weights (missing/unexpected/mis-shaped tensors are errors)."""
    from velocis.models import VelocisModel

    with torch.device("meta"):  # no wasted random init: every tensor comes from `state`
        model = VelocisModel(cfg)
    quantized = _quantized_names(cfg, model, where)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VelocisError(
            f"{where}: weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; is the checkpoint complete and "
            f"from this architecture?")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise VelocisError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
        if k in quantized and state[k].dtype != v.dtype:
            raise VelocisError(f"{where}: quantized tensor {k} is {state[k].dtype}, the format stores {v.dtype}; "
                               f"re-quantize the model with `velocis quantize`")
    if dtype is None:  # keep the stored precision (a bf16 checkpoint stays bf16)
        dtype = next((v.dtype for k, v in state.items() if v.is_floating_point() and k not in quantized),
                     torch.float32)
    params = {k for k, _ in model.named_parameters()}
    for k in list(state):  # one tensor at a time, and assign (no copy): the peak stays about one model
        v = state[k]
        cast = dtype if (k in params and v.is_floating_point()) else v.dtype  # buffers keep their dtype
        state[k] = v.to(device=device, dtype=cast)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialize_buffers(model, device)
    if quantized:  # quantized modules compute in the model's float dtype (their codes and scales keep theirs)
        for m in model.modules():
            if hasattr(m, "compute_dtype"):
                m.compute_dtype = dtype
    return model.eval()


def _quantized_names(cfg: ModelConfig, model, where: str) -> set[str]:
    """A quantized checkpoint (config.json has `quantization`): swap the named modules of the meta
    model for quantized ones (velocis.quant), so the state dict's qweight / scales / zeros fit.
    Returns the names of the stored quantized tensors (they keep their dtypes: int8/uint8 codes,
    float16 scales)."""
    if cfg.quantization is None:
        return set()
    from velocis.quant.swap import swap_for_loading

    swap_for_loading(model, cfg.quantization, where)
    return {f"{m}.{t}" for m in cfg.quantization["modules"] for t in _QUANT_TENSORS} | {
        f"{m}.{p}.{t}" for m in cfg.quantization["modules"] for p in ("gate_up_proj", "down_proj")
        for t in _QUANT_TENSORS}


_QUANT_TENSORS = ("qweight", "scales", "zeros")


def _materialize_buffers(model, device) -> None:
    """Buffers not in the file (RoPE frequencies, MoE load counters) are still on the meta device:
    allocate them (zeros) and let a module that has non-zero ones rebuild them (`init_buffers()`)."""
    for m in model.modules():
        for name, buf in list(m._buffers.items()):
            if buf is not None and buf.is_meta:
                m._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
        if hasattr(m, "init_buffers"):
            m.init_buffers()


def load_tokenizer(path: str | Path):
    """The directory's tokenizer (velocis.tokenizer.Tokenizer), or None if it has none."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    from velocis.tokenizer import Tokenizer

    return Tokenizer.load(path)


def is_velocis_dir(path: str | Path) -> bool:
    f = Path(path) / CONFIG
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("architecture") == "velocis"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_model_dir(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """Velocis model / run / checkpoint dir -> (model, tokenizer or None)."""
    from velocis.utils.output_dir import as_path

    path = as_path(path, "path")
    require_dtype(dtype)
    cfg = ModelConfig.load(path / CONFIG)
    if not (path / WEIGHTS).is_file():
        raise VelocisError(f"{path}: has config.json but no {WEIGHTS}; was the save interrupted?")
    model = build_model(cfg, read_safetensors(path / WEIGHTS), where=str(path), device=device, dtype=dtype)
    return model, load_tokenizer(path)
