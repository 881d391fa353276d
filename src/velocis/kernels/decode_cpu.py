"""Whole-model CPU decoding (csrc/decode_cpu.cpp) for dense Llama-shaped models.

    plan = decode_plan(model)             # None when the model or machine does not qualify (why: `why_not`)
    kv = plan.new_cache(max_len)
    logits = plan.forward(token_ids, start, kv)     # [vocab], the last token's; k/v written at start..

One C++ call runs every layer of a chunk of tokens (prefill) or of one token (decode) with the
weights in their stored form: fp32, bf16 or fp16 weights, and velocis.quant's int8 / int4 (repacked
here once per plan, as csrc/decode_cpu.cpp lays out above rows_quant: 4-bit codes per pair of
32-column blocks, float16 scales and uint8 zero points as stored, laid out 4 rows side by side). What qualifies: every block attention + SwiGLU MLP (Llama, Qwen2's q/k/v bias,
Qwen3's q/k norms), RoPE without dynamic scaling, quantized inputs a multiple of 32 wide.

Reference: VelocisModel.forward with a cache. Float weights match it to fp32 rounding (the C++
path accumulates in fp32 whatever the weight dtype; a bf16 model's reference computes in bf16).
Quantized weights multiply activations quantized to int8 per 32 values (llama.cpp's scheme), so
they match the dequantized reference to about 1e-2 relative (tests/test_decode_cpu.py states it).
`VELOCIS_DECODE_KERNEL=0` turns the path off (generation then runs the model's own forward).
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from velocis.kernels import cpu_ops

F32, BF16, F16, Q8, Q4 = 0, 1, 2, 3, 4
FLOAT_KINDS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
QBLOCK = 32
CHUNK = 64  # prefill tokens per call: the activations stay in L2 while each weight row is reused

_EMPTY = torch.empty(0)
_plans: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, DecodePlan]]" = weakref.WeakKeyDictionary()


class Unsupported(Exception):
    """Why a model cannot take the C++ decode path (it then decodes through its own forward)."""


def repack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Stored int4 bytes (column 2j low nibble, 2j+1 high) -> the kernel's: per pair of 32-column
    blocks, byte j holds column j of the first block (low nibble) and of the second (high); an odd
    last block packs its columns j (low) and j + 16 (high)."""
    from velocis.quant.formats import unpack_int4

    u = unpack_int4(qweight)  # [out, in] codes
    rows, nb = u.shape[0], u.shape[1] // QBLOCK
    pairs = u[:, :nb // 2 * 2 * QBLOCK].reshape(rows, nb // 2, 2, QBLOCK)
    parts = [(pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(rows, -1)]
    if nb % 2:
        last = u[:, -QBLOCK:]
        parts.append(last[:, :QBLOCK // 2] | (last[:, QBLOCK // 2:] << 4))
    return torch.cat(parts, dim=1).contiguous()


def by_four_rows(per_row: torch.Tensor) -> torch.Tensor:
    """[rows, groups] -> [ceil(rows / 4), groups, 4] (dtype kept): a register block's 4 rows side by side."""
    t = per_row
    t = torch.cat([t, t.new_zeros((-t.shape[0]) % 4, t.shape[1])])
    return t.view(-1, 4, t.shape[1]).transpose(1, 2).contiguous()


def pack_matrix(module: nn.Module, what: str) -> tuple[list[torch.Tensor], list[int]]:
    """A projection -> ([weight, scales, zero points], [kind, rows, cols, group]) for the kernel (scales
    float16 and zero points uint8, as QuantLinear stores them). QuantLinear is recognised by its stored
    codes (`qweight` + `spec`), not imported: quant/linear.py calls into this module."""
    if hasattr(module, "qweight") and hasattr(module, "spec"):
        spec, rows, cols = module.spec, module.out_features, module.in_features
        if cols % QBLOCK or (spec.group_size or cols) % QBLOCK or module.qweight.shape[-1] * (2 if spec.bits == 4 else 1) != cols:
            raise Unsupported(f"{what}: {cols} input columns are not a multiple of 32")
        scales = module.scales.to(torch.float16)  # already float16-exact (quant/formats.py)
        group = spec.group_size or cols
        if spec.bits == 8:
            return [module.qweight.contiguous(), by_four_rows(scales), _EMPTY], [Q8, rows, cols, group]
        zeros = module.zeros if module.zeros is not None else torch.full(scales.shape, 8, dtype=torch.uint8)
        return [repack_int4(module.qweight), by_four_rows(scales), by_four_rows(zeros.to(torch.uint8))], [Q4, rows, cols, group]
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
        if w.dtype not in FLOAT_KINDS:
            raise Unsupported(f"{what}: weights of dtype {w.dtype}")
        return [w.contiguous(), _EMPTY, _EMPTY], [FLOAT_KINDS[w.dtype], w.shape[0], w.shape[1], 0]
    raise Unsupported(f"{what}: a {type(module).__name__}")


def _vec(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t.detach().float().contiguous()


def why_not(model: nn.Module) -> str | None:
    """None if `model` takes the C++ decode path here, else the reason it does not."""
    if os.environ.get("VELOCIS_DECODE_KERNEL", "1") == "0":
        return "turned off by VELOCIS_DECODE_KERNEL=0"
    if cpu_ops.ops() is None:
        return "the C++ CPU kernels are unavailable"
    try:
        _plan(model)
    except Unsupported as e:
        return str(e)
    return None


def decode_plan(model: nn.Module) -> "DecodePlan | None":
    """The model's plan (built once, rebuilt when a weight changed in place or was replaced), or None."""
    if os.environ.get("VELOCIS_DECODE_KERNEL", "1") == "0" or cpu_ops.ops() is None:
        return None
    try:
        return _plan(model)
    except Unsupported:
        return None


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under inference_mode) keeps no version counter
        return -1


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when a weight is replaced or modified in place (the plan holds copies of some)."""
    return tuple((t.data_ptr(), _version(t)) for t in model.state_dict(keep_vars=True).values())


def _plan(model: nn.Module) -> "DecodePlan":
    key = _fingerprint(model)
    cached = _plans.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = DecodePlan(model)
    _plans[model] = (key, plan)
    return plan


class DecodePlan:
    """The model's weights flattened for csrc/decode_cpu.cpp (see its `make_model` for the order)."""

    def __init__(self, model: nn.Module):
        from velocis.models.attention import Attention
        from velocis.models.layers import MLP

        cfg = model.config
        if model.device.type != "cpu":
            raise Unsupported(f"the model is on {model.device}, not the CPU")
        emb = model.embed_tokens.weight.detach()
        if emb.dtype not in FLOAT_KINDS:
            raise Unsupported(f"embedding dtype {emb.dtype}")
        tensors = [emb.contiguous(), _vec(model.norm.weight)]
        head_t, head_m = pack_matrix(model.lm_head, "lm_head")
        tensors += head_t
        meta = [cfg.hidden_dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                cfg.vocab_size, cfg.max_seq_len, FLOAT_KINDS[emb.dtype]] + head_m
        for i, block in enumerate(model.layers):
            att, mlp = block.mixer, block.feed_forward
            if type(att) is not Attention or type(mlp) is not MLP:
                raise Unsupported(f"layer {i} is {block.mixer_name} + {block.feed_forward_name}; the C++ decode "
                                  f"path runs attention + mlp layers only")
            if att.rotary.dynamic:
                raise Unsupported("dynamic RoPE scaling")
            tensors.append(_vec(block.mixer_norm.weight))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t, m = pack_matrix(getattr(att, name), f"layers.{i}.mixer.{name}")
                tensors += t
                meta += m
            tensors += [_vec(getattr(att, name).bias) for name in ("q_proj", "k_proj", "v_proj")]
            tensors += [_vec(att.q_norm.weight), _vec(att.k_norm.weight)] if att.qk_norm else [_EMPTY, _EMPTY]
            tensors.append(_vec(block.ff_norm.weight))
            for name in ("gate_proj", "up_proj", "down_proj"):
                t, m = pack_matrix(getattr(mlp, name), f"layers.{i}.feed_forward.{name}")
                tensors += t
                meta += m
        if cfg.head_dim % 2:
            raise Unsupported(f"odd head_dim {cfg.head_dim}")
        self.tensors, self.meta, self.eps = tensors, meta, float(cfg.norm_eps)
        self.num_layers, self.num_kv_heads, self.head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.max_len = cfg.max_seq_len
        rotary = model.layers[0].mixer.rotary
        cos, sin = rotary(torch.arange(self.max_len), torch.float32)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
        self.ops = cpu_ops.ops()
        self.handle = self.ops.decode_plan_new(tensors, meta, self.eps)  # the C++ side keeps the tensors

    def __del__(self):
        handle, ops = getattr(self, "handle", None), getattr(self, "ops", None)
        if handle is not None and ops is not None:
            try:
                ops.decode_plan_free(handle)
            except Exception:  # interpreter shutdown: the registry goes with the process
                pass

    def new_cache(self, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [layers, kv_heads, max_len, head_dim] (fp32), max_len defaulting to the
        model's context; slots past the written positions are never read."""
        shape = (self.num_layers, self.num_kv_heads, min(max_len or self.max_len, self.max_len), self.head_dim)
        return torch.empty(shape), torch.empty(shape)

    def forward(self, tokens, start: int, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Tokens (ids) at positions start, start+1, ... -> the last one's logits [vocab] (fp32)."""
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if len(ids) <= CHUNK:
            return self.ops.decode_chunk(self.handle, ids, start, cache[0], cache[1], self.cos, self.sin)
        for s in range(0, len(ids), CHUNK):
            logits = self.ops.decode_chunk(self.handle, ids[s:s + CHUNK].contiguous(), start + s, cache[0], cache[1],
                                           self.cos, self.sin)
        return logits


SMALL_ROWS = 32  # up to here the weight-only kernels beat dequantizing the whole weight per call


def quant_linear(x: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
    """QuantLinear's CPU inference forward for a few rows (decoding): the weight-only kernels, fp32
    activations against the stored codes, equal to the dequantizing reference up to fp32 rounding
    (so batched decoding equals decoding alone, and a cached step equals the full forward). None
    where the caller's reference should run: more than SMALL_ROWS rows (prefill: one dequantization
    is amortized), no kernels, VELOCIS_DECODE_KERNEL=0, or a width that is not a multiple of 32."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > SMALL_ROWS or os.environ.get("VELOCIS_DECODE_KERNEL", "1") == "0" or cpu_ops.ops() is None:
        return None
    key = (module.qweight.data_ptr(), *(_version(t) for t in (module.qweight, module.scales, module.zeros) if t is not None))
    cached = getattr(module, "_decode_pack", None)
    if cached is None or cached[0] != key:
        try:
            cached = (key, *pack_matrix(module, type(module).__name__))
        except Unsupported:
            cached = (key, None, None)
        module._decode_pack = cached
    _, t, m = cached
    if t is None:
        return None
    y = cpu_ops.ops().matvec(x.reshape(rows, -1).float().contiguous(), m[0], t[0], t[1], t[2], m[1], m[2], m[3], True)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], m[1])


def matvec(x: torch.Tensor, module: nn.Module, exact: bool = False) -> torch.Tensor:
    """x [T, in] through one projection with the decode kernels (tests hold them to the reference);
    exact: quantized weights against fp32 activations instead of int8 ones."""
    t, m = pack_matrix(module, type(module).__name__)
    return cpu_ops.ops().matvec(x.float().contiguous(), m[0], t[0], t[1], t[2], m[1], m[2], m[3], exact)
