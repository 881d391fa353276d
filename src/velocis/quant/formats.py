"""Weight-only block quantization formats: the tensor layout, quantize, pack, dequantize.

A weight W [out, in] (or a stack [E, out, in] of experts) is cut along its input dimension into
groups of `group_size` consecutive columns (or one group per output row: "per channel",
group_size None, int8 only). Every group of every row has its own scale (and, for asymmetric int4,
an integer zero point).

    int8, symmetric:        q = clamp(round(w / s), -127, 127)          w ~ s * q
                            s = absmax(group) / 127
    int4, asymmetric:       u = clamp(round(w / s) + z, 0, 15)          w ~ s * (u - z)
                            s = (max(group, 0) - min(group, 0)) / 15, z = clamp(round(-min / s), 0, 15)
    int4, symmetric:        u = clamp(round(w / s), -8, 7) + 8          w ~ s * (u - 8)
                            s = absmax(group) / 7

The scale is rounded to its stored dtype (float16) *before* the codes are computed, so the codes
are the best ones for the scale that is actually stored.

Stored tensors (safetensors, one set per quantized module `NAME`):

    NAME.qweight   int8  [out, in_p]       (int8: the signed codes q)
                   uint8 [out, in_p / 2]   (int4: two codes per byte; byte j of a row holds column 2j
                                            in its low nibble and column 2j + 1 in its high nibble)
    NAME.scales    float16 [out, in_p / group_size]   (per channel: [out, 1])
    NAME.zeros     uint8 [out, in_p / group_size]     (asymmetric int4 only, values 0..15, one byte each;
                                                       symmetric int4 has the implicit zero point 8)
    NAME.bias      the module's bias, in the model's dtype, if it has one

A stack of experts has the same tensors with a leading [E] dimension. `in_p` is `in` padded up to
a multiple of group_size: a size that is not a multiple is padded with zero columns (their codes
dequantize to exactly 0; the modules drop them), so every group is whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from velocis.errors import VelocisError

SCALE_DTYPE = torch.float16
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QSpec:
    """How one weight is quantized."""

    bits: int
    group_size: int | None  # None: one group per output row (int8 only)
    symmetric: bool

    def __post_init__(self) -> None:
        check_spec(self.bits, self.group_size, self.symmetric)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1  # largest int4 code (15)

    def padded(self, in_features: int) -> int:
        g = self.group_size
        return in_features if g is None else -(-in_features // g) * g

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else self.padded(in_features) // self.group_size

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'symmetric' if self.symmetric else 'asymmetric'}"

    @classmethod
    def of(cls, d: dict) -> "QSpec":
        return cls(int(d["bits"]), d.get("group_size"), bool(d.get("symmetric", d["bits"] == 8)))


def check_spec(bits, group_size, symmetric) -> None:
    if bits not in BITS:
        raise VelocisError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise VelocisError(f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}"
                           f"{' (or per channel for int8)' if bits == 8 else ''}, got {group_size!r}")
    if bits == 4 and group_size is None:
        raise VelocisError("int4 quantization needs a group size (32, 64 or 128); per-channel int4 loses too much")
    if bits == 8 and not symmetric:
        raise VelocisError("int8 quantization is symmetric only (no zero points); drop the asymmetric request")


@dataclass
class QTensor:
    """The stored tensors of one quantized weight (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QSpec
    in_features: int

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            d["zeros"] = self.zeros
        return d

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.spec, self.in_features, dtype)


# ---------------------------------------------------------------------------
# int4 packing


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., n] (n even) -> uint8 [..., n / 2]: column 2j low nibble, 2j + 1 high nibble."""
    if u.shape[-1] % 2:
        raise VelocisError(f"int4 packing needs an even number of columns, got {u.shape[-1]}")
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> codes uint8 [..., 2m] (the inverse of pack_int4)."""
    return torch.stack([p & 0x0F, p >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------
# scales, zero points, codes


def _round_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as it will be stored (float16), back in fp32; never zero, never inf."""
    tiny = torch.finfo(SCALE_DTYPE).tiny  # smallest normal float16
    if bool((s > torch.finfo(SCALE_DTYPE).max).any()):
        raise VelocisError(f"a weight group needs a scale of {float(s.max()):.3g}, beyond float16's range; "
                           f"the weights are too large to quantize in this format")
    return s.clamp(min=tiny).to(SCALE_DTYPE).float()


def group_params(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., G, g] (fp32, grouped along the last dim) -> (scale [..., G] fp32, already float16-exact,
    zero point [..., G] fp32 holding integers: 0 for int8, 8 for symmetric int4)."""
    if spec.bits == 8:
        s = _round_scale(w.abs().amax(-1) / 127.0)
        return s, torch.zeros_like(s)
    if spec.symmetric:
        s = _round_scale(w.abs().amax(-1) / 7.0)
        return s, torch.full_like(s, 8.0)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the range always holds 0
    s = _round_scale((hi - lo) / spec.qmax)
    z = torch.round(-lo / s).clamp(0, spec.qmax)
    return s, z


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Integer codes (as fp32) of w for broadcastable scale / zero: int8 in [-127, 127], int4 in [0, 15]."""
    if spec.bits == 8:
        return torch.round(w / scale).clamp(-127, 127)
    return (torch.round(w / scale) + zero).clamp(0, spec.qmax)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """What w becomes after quantization: scale * (code - zero)."""
    return scale * (codes(w, scale, zero, spec) - zero)


def pad_columns(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    pad = spec.padded(w.shape[-1]) - w.shape[-1]
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QSpec, in_features: int) -> QTensor:
    """Codes [..., out, in_p] (fp32 integers) and per-group scale / zero [..., out, G] -> stored tensors."""
    if spec.bits == 8:
        qweight = q.to(torch.int8)
    else:
        qweight = pack_int4(q.to(torch.uint8))
    zeros = None if (spec.bits == 8 or spec.symmetric) else zero.to(torch.uint8)
    return QTensor(qweight.contiguous(), scale.to(SCALE_DTYPE).contiguous(),
                   None if zeros is None else zeros.contiguous(), spec, in_features)


def quantize_rtn(w: torch.Tensor, spec: QSpec) -> QTensor:
    """Round-to-nearest: W [..., out, in] (any float dtype) -> QTensor."""
    in_features = w.shape[-1]
    wp = pad_columns(w.detach().float(), spec)
    g = wp.shape[-1] if spec.group_size is None else spec.group_size
    grouped = wp.unflatten(-1, (wp.shape[-1] // g, g))  # [..., out, G, g]
    s, z = group_params(grouped, spec)
    q = codes(grouped, s.unsqueeze(-1), z.unsqueeze(-1), spec).flatten(-2)
    return pack(q, s, z, spec, in_features)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QSpec,
               in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored tensors -> W [..., out, in] in `dtype` (computed in fp32; padding columns dropped)."""
    q = qweight.float() if spec.bits == 8 else unpack_int4(qweight).float()
    q = q.unflatten(-1, (scales.shape[-1], -1))  # [..., out, G, g]
    if spec.bits == 4:
        q = q - (8.0 if zeros is None else zeros.float().unsqueeze(-1))
    w = (q * scales.float().unsqueeze(-1)).flatten(-2)
    if w.shape[-1] != in_features:
        w = w[..., :in_features]
    return w.to(dtype).contiguous()


def stored_shapes(out_features: int, in_features: int, spec: QSpec, lead: tuple[int, ...] = ()) -> dict:
    """{name: (shape, dtype)} of the stored tensors of one weight (what a module allocates)."""
    in_p, groups = spec.padded(in_features), spec.num_groups(in_features)
    shapes = {
        "qweight": ((*lead, out_features, in_p if spec.bits == 8 else in_p // 2),
                    torch.int8 if spec.bits == 8 else torch.uint8),
        "scales": ((*lead, out_features, groups), SCALE_DTYPE),
    }
    if spec.bits == 4 and not spec.symmetric:
        shapes["zeros"] = ((*lead, out_features, groups), torch.uint8)
    return shapes


# ---------------------------------------------------------------------------
# config.json's "quantization" entry

METHODS = ("rtn", "gptq")
FORMAT_VERSION = 1
_KEYS = {"format", "method", "bits", "group_size", "symmetric", "scale_dtype", "modules", "overrides", "calibration"}


def check_quantization_config(q) -> None:
    """Validate config.json's `quantization` dict (VelocisError naming the problem):

        {"format": 1, "method": "rtn" | "gptq", "bits": 4 | 8, "group_size": 32 | 64 | 128 | null,
         "symmetric": bool, "scale_dtype": "float16",
         "modules": [names of the quantized modules (Linear projections, MoE expert stacks)],
         "overrides": {name: {"bits", "group_size", "symmetric"}}    (modules quantized otherwise, e.g. lm_head),
         "calibration": {...}                                         (GPTQ's data and settings; informational)}
    """
    if not isinstance(q, dict):
        raise VelocisError(f"quantization must be a dict or null, got {type(q).__name__}")
    unknown = sorted(set(q) - _KEYS)
    if unknown:
        raise VelocisError(f"quantization has unknown keys {unknown}; known: {', '.join(sorted(_KEYS))}")
    missing = [k for k in ("method", "bits", "modules") if k not in q]
    if missing:
        raise VelocisError(f"quantization lacks {', '.join(missing)}")
    if q.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise VelocisError(f"quantization format {q['format']!r} is not one this Velocis reads ({FORMAT_VERSION}); "
                           f"upgrade Velocis or re-quantize")
    if q["method"] not in METHODS:
        raise VelocisError(f"quantization method {q['method']!r} must be one of {', '.join(METHODS)}")
    if q.get("scale_dtype", "float16") != "float16":
        raise VelocisError(f"quantization scale_dtype {q['scale_dtype']!r}: only float16 scales are supported")
    _check_spec_dict(q, "quantization")
    mods = q["modules"]
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise VelocisError("quantization modules must be a non-empty list of module names")
    if len(set(mods)) != len(mods):
        raise VelocisError("quantization modules lists a module twice")
    over = q.get("overrides") or {}
    if not isinstance(over, dict):
        raise VelocisError("quantization overrides must be a dict {module name: {bits, group_size, symmetric}}")
    for name, d in over.items():
        if name not in mods:
            raise VelocisError(f"quantization overrides {name!r}, which is not in its modules")
        if not isinstance(d, dict) or set(d) - {"bits", "group_size", "symmetric"}:
            raise VelocisError(f"quantization overrides[{name!r}] must be a dict of bits, group_size, symmetric")
        _check_spec_dict(d, f"quantization overrides[{name!r}]")
    if "calibration" in q and q["calibration"] is not None and not isinstance(q["calibration"], dict):
        raise VelocisError("quantization calibration must be a dict or null")


def _check_spec_dict(d: dict, where: str) -> None:
    bits, group, sym = d.get("bits"), d.get("group_size"), d.get("symmetric", d.get("bits") == 8)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise VelocisError(f"{where} bits must be 4 or 8, got {bits!r}")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise VelocisError(f"{where} group_size must be an integer or null, got {group!r}")
    if not isinstance(sym, bool):
        raise VelocisError(f"{where} symmetric must be true or false, got {sym!r}")
    try:
        check_spec(bits, group, sym)
    except VelocisError as e:
        raise VelocisError(f"{where}: {e}") from None


def spec_for(q: dict, name: str) -> QSpec:
    """The QSpec of module `name` under config `q` (its override, else the main one)."""
    return QSpec.of((q.get("overrides") or {}).get(name, q))
