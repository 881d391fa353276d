"""Which modules are quantized, and swapping them for quantized ones (gpt-fast's quantize.py pattern).

The rule (`quantizable(model)`), recorded as an explicit list of names in config.json's
`quantization.modules`:
  * every Linear projection (nn.Linear, velocis.kernels.gemm.Linear): attention q/k/v/o, MLA's
    q_a/q_b/q/kv_a/kv_b/o, MLP gate/up/down, MoE shared experts, the MTP modules' projections
    (eh_proj and their blocks), with the requested bits / group size;
  * MoE routed experts (the stacked [E, out, in] parameters of models.moe.Experts) with the same
    spec, per expert and per row, as QuantExperts: an MoE's weights are mostly experts, so leaving
    them in float would leave most of the model unquantized;
  * the LM head, only when untied: int8 per output row (an override), whatever the main bits; the
    logits are the most quantization-sensitive product and int8 per row costs them almost nothing;
  * kept in their dtype: the token embedding (a row lookup, not a matmul: no compute to save), and
    with it a tied head; norms; MoE routers (routing decisions flip easily); DeepSeek sparse
    attention's indexer (top-k selection, small).

    spec = quantization_config(model, bits=4, group_size=32, symmetric=False, method="rtn")
    swap_for_loading(model, spec)        # a (meta) float model -> quantized modules, empty, for a state dict
    quantize_model(model, bits=4, ...)   # in place: quantize the float weights, swap, record model.config
"""
from __future__ import annotations

from torch import nn

from velocis.errors import VelocisError
from velocis.models.moe import Experts
from velocis.quant.formats import FORMAT_VERSION, METHODS, QSpec, spec_for
from velocis.quant.linear import QuantExperts, QuantWeight, make_linear, set_module

HEAD = "lm_head"
HEAD_SPEC = {"bits": 8, "group_size": None, "symmetric": True}


def quantizable(model: nn.Module) -> list[str]:
    """Names of the modules the rule above quantizes, in module order."""
    tied = bool(getattr(model.config, "tie_embeddings", False))
    names = []
    for name, m in model.named_modules():
        if name == HEAD:
            if not tied and isinstance(m, nn.Linear):
                names.append(name)
        elif isinstance(m, nn.Linear) and ".indexer." not in f".{name}.":
            names.append(name)
        elif isinstance(m, Experts):
            names.append(name)
    return names


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.config, "quantization", None) is not None or any(
        isinstance(m, (QuantWeight, QuantExperts)) for m in model.modules())


def quantization_config(model: nn.Module, bits: int, group_size: int | None, symmetric: bool | None = None,
                        method: str = "rtn", calibration: dict | None = None) -> dict:
    """config.json's `quantization` entry for quantizing `model` this way (checked)."""
    if method not in METHODS:
        raise VelocisError(f"quantization method {method!r} must be one of {', '.join(METHODS)}")
    symmetric = (bits == 8) if symmetric is None else symmetric
    QSpec(bits, group_size, symmetric)  # a clear error for a bad combination
    names = quantizable(model)
    if not names:
        raise VelocisError("this model has no Linear projections to quantize")
    q = {"format": FORMAT_VERSION, "method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
         "scale_dtype": "float16", "modules": names}
    if HEAD in names:
        q["overrides"] = {HEAD: dict(HEAD_SPEC)}
    if calibration is not None:
        q["calibration"] = calibration
    return q


def _get(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise VelocisError(f"{where}: quantization names module {name!r}, which this model does not have; "
                           f"is config.json from this checkpoint?") from None


def swap_for_loading(model: nn.Module, q: dict, where: str = "") -> nn.Module:
    """Replace the modules `q["modules"]` names by empty quantized ones on the same device (built
    on the meta device before a state dict is loaded with assign=True). Returns the model."""
    for name in q["modules"]:
        m = _get(model, name, where)
        spec = spec_for(q, name)
        if isinstance(m, nn.Linear):
            w = m.weight
            new = make_linear(m.in_features, m.out_features, m.bias is not None, spec, device=w.device, dtype=w.dtype)
        elif isinstance(m, Experts):
            gu, dn = m.gate_up_proj, m.down_proj
            new = QuantExperts(gu.shape[0], gu.shape[2], dn.shape[2], spec, device=gu.device, dtype=gu.dtype)
        else:
            raise VelocisError(f"{where}: quantized module {name!r} is a {type(m).__name__}, not a Linear or "
                               f"MoE experts; the checkpoint does not fit this model")
        set_module(model, name, new)
    return model


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 32, symmetric: bool | None = None,
                   method: str = "rtn", calibration=None, calibration_info: dict | None = None, **gptq_options):
    """Quantize `model` (a float VelocisModel) in place: every module of the rule above becomes a
    quantized one, and model.config records it (so save_model writes a quantized checkpoint).

    method "rtn": round-to-nearest; "gptq": `calibration` token ids LongTensor [N, T] (GPTQ options:
    damp=0.01, block_size=128, batch_size=8). Returns the model."""
    if is_quantized(model):
        raise VelocisError("this model is already quantized; quantize the original float model instead")
    if method == "gptq" and calibration is None:
        raise VelocisError("GPTQ needs calibration data (--calibration FILE: text in the model's language)")
    q = quantization_config(model, bits, group_size, symmetric, method, calibration_info)
    was_training = model.training
    model.eval()
    if method == "gptq":
        from velocis.quant.gptq import gptq_quantize

        gptq_quantize(model, q, calibration, **gptq_options)
    else:
        from velocis.quant.rtn import rtn_quantize

        rtn_quantize(model, q)
    model.config = model.config.replace(quantization=q)
    model.train(was_training)
    return model
