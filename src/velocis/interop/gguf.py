"""GGUF files (llama.cpp) in and out.

    export_gguf(model, tokenizer, "m.gguf", type="q8_0")    # velocis export --format gguf --type q8_0
    model, tok = load_gguf("m.gguf")                        # velocis convert --from-gguf m.gguf --output DIR

Architectures. A dense Velocis attention model (GQA/MQA/MHA, SwiGLU, RMSNorm, RoPE) is written as
llama.cpp's `llama`; with q/k/v biases as `qwen2`; with per-head q/k RMSNorm as `qwen3`. Anything
else (MoE, MLA, DSA, MTP, dynamic-NTK RoPE, ...) is refused. Reading takes `llama` (dense),
`qwen2` and `qwen3` files.

RoPE layout. Velocis (like transformers) rotates the two halves of a head vector (NEOX style in
llama.cpp), and so do llama.cpp's qwen2/qwen3. llama.cpp's `llama` rotates adjacent pairs
(2i, 2i+1) instead, so its q/k rows are stored permuted, exactly as llama.cpp's
convert_hf_to_gguf.py does for LlamaForCausalLM: per head, row i of the first half goes to 2i and
row i of the second half to 2i+1 (`permute_qk`); reading undoes it (`unpermute_qk`).
RoPE scaling: linear -> rope.scaling.type linear; static NTK -> folded into rope.freq_base (exact);
yarn -> rope.scaling.type yarn (the transformers defaults; mscale variants are refused);
llama3 -> a rope_freqs tensor of per-frequency divisors (as convert_hf_to_gguf.py writes for
Llama 3.1); dynamic NTK has no llama.cpp equivalent and is refused.

Tensor types (--type, `GGUF_TYPES`). 1-D tensors (norms, biases, rope_freqs) are always F32, as in
llama.cpp. f32/f16/bf16: every matrix in that type. q8_0: every matrix (token_embd and output too,
as convert_hf_to_gguf.py --outtype q8_0 does). q4_0: every matrix in Q4_0 except the output
projection (output.weight, or token_embd when the embeddings are tied), kept in Q8_0: llama-quantize
keeps it at 6 bits (Q6_K), which gguf cannot write, so Q8_0 is the nearest we can. A matrix whose
rows are not a multiple of the 32-value block is written F16 (llama.cpp's converter does the same);
`export_gguf` reports which. Block layouts are GGML's: Q8_0 = fp16 scale d + 32 int8 (x = q * d);
Q4_0 = fp16 scale d + 16 bytes, element j in the low nibble of byte j and element j + 16 in its
high nibble (x = (nibble - 8) * d). The quantizers are the gguf package's (bit-exact with ggml's
reference C code; tests/test_gguf.py checks them against an independent implementation).

Tokenizer. Velocis tokenizers are byte-level BPE; they are written as tokenizer.ggml.model "gpt2"
(tokens, merges, token types, bos/eos/pad ids) with pre-tokenizer "qwen2": llama.cpp's qwen2
regex is Velocis' except that Velocis also splits Han runs from other letters, and since no
merge was ever learned across such a boundary, both give the same tokens. The tokenizer.json
itself is stored too (tokenizer.huggingface.json) so reading it back is exact. A model vocabulary
larger than the tokenizer's is padded with unused "[PAD{i}]" tokens, as llama.cpp's converter does.
Reading builds a `tokenizers` BPE from tokens + merges (pre-tokenizers qwen2, llama-bpe/llama3,
gpt-2: `PRE_TOKENIZERS`); a SentencePiece ("llama") vocabulary is refused.
Velocis-only facts ride along under "velocis.*" keys (the prompt-start token, llama3 RoPE
parameters); llama.cpp ignores them.
"""
from __future__ import annotations

import builtins
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # what load_gguf reads
BLOCK = 32  # values per Q8_0 / Q4_0 block

# Velocis name (inside layers.{i}.) <-> llama.cpp name (inside blk.{i}.)
_LAYER_NAMES = {
    "mixer_norm.weight": "attn_norm.weight",
    "mixer.q_proj.weight": "attn_q.weight",
    "mixer.k_proj.weight": "attn_k.weight",
    "mixer.v_proj.weight": "attn_v.weight",
    "mixer.o_proj.weight": "attn_output.weight",
    "mixer.q_proj.bias": "attn_q.bias",
    "mixer.k_proj.bias": "attn_k.bias",
    "mixer.v_proj.bias": "attn_v.bias",
    "mixer.q_norm.weight": "attn_q_norm.weight",
    "mixer.k_norm.weight": "attn_k_norm.weight",
    "ff_norm.weight": "ffn_norm.weight",
    "feed_forward.gate_proj.weight": "ffn_gate.weight",
    "feed_forward.up_proj.weight": "ffn_up.weight",
    "feed_forward.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_FROM_GGUF = {v: k for k, v in _LAYER_NAMES.items()}
_GLOBAL_FROM_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()}

# Key names outside llama.cpp's own (it ignores them)
KEY_PROMPT_START = "velocis.prompt_start_token_id"  # -1: nothing goes before a prompt
KEY_ROPE_SCALING = "velocis.rope_scaling"  # JSON of ModelConfig.rope_scaling (llama3: not in llama.cpp keys)

# llama.cpp pre-tokenizer name -> (split regex, ignore_merges) for rebuilding a gpt2-style BPE
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "qwen2": (_QWEN2_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, True), "llama3": (_LLAMA3_SPLIT, True), "llama-v3": (_LLAMA3_SPLIT, True),
    "gpt-2": (_GPT2_SPLIT, False),
}
_PAD_TOKEN = re.compile(r"\[PAD(\d+)\]")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise VelocisError("GGUF support needs the gguf package: pip install gguf") from None
    return gguf


# --------------------------------------------------------------------------- quantization
def _qtype(type: str):
    g = _gguf()
    T = g.GGMLQuantizationType
    table = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
    if type not in table:
        raise VelocisError(f"GGUF type {type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    return table[type]


def quantize(x, type: str) -> np.ndarray:
    """A float array [..., n] in GGUF `type`: float32/float16 arrays for f32/f16, else the raw bytes
    [..., n / block * bytes per block] (uint8) as GGML stores them (q8_0, q4_0: n % 32 == 0)."""
    quants = _gguf().quants
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    qtype = _qtype(type)
    if type in ("q8_0", "q4_0") and x.shape[-1] % BLOCK:
        raise VelocisError(f"{type}: rows of {x.shape[-1]} values are not a multiple of the {BLOCK}-value block")
    return quants.quantize(x, qtype)


def dequantize(data: np.ndarray, type) -> np.ndarray:
    """float32 values of GGUF data (`type`: one of GGUF_TYPES or a gguf GGMLQuantizationType)."""
    quants = _gguf().quants
    qtype = _qtype(type) if isinstance(type, str) else type
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32)


# --------------------------------------------------------------------------- q/k layout
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows (HF/Velocis) -> llama.cpp `llama` interleaved rows, per head (weights [rows, in]
    or biases [rows]); as LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- export
def _gguf_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture for `cfg`, or a VelocisError saying why there is none."""
    why = []
    if getattr(cfg, "quantization", None):
        why.append("Velocis weight quantization (`velocis quantize`): export the unquantized model and choose "
                   "--type q8_0 or q4_0")
    if any(m != "attention" for m in cfg.mixers()):
        why.append(f"mixers {sorted(set(cfg.mixers()))} (GGUF export writes standard attention only)")
    if any(f != "mlp" for f in cfg.feed_forwards()):
        why.append("a mixture-of-experts feed-forward")
    if cfg.mtp_depth:
        why.append("multi-token-prediction modules")
    if cfg.index_num_heads:
        why.append("DeepSeek sparse attention")
    if cfg.qkv_bias and cfg.qk_norm:
        why.append("both q/k/v biases and q/k norm (no llama.cpp architecture has both)")
    s = cfg.rope_scaling
    if s and s["type"] == "dynamic":
        why.append("dynamic-NTK RoPE scaling (llama.cpp has no equivalent; use linear, yarn or llama3)")
    if s and s["type"] == "yarn" and any(s.get(k) is not None for k in ("mscale", "mscale_all_dim", "attention_factor")):
        why.append("YaRN with mscale/attention_factor (llama.cpp computes its attention factor differently)")
    if s and s["type"] == "yarn" and s.get("truncate") is False:
        why.append("YaRN with truncate=false")
    if s and s["type"] == "llama3" and (cfg.qkv_bias or cfg.qk_norm):
        why.append("Llama-3 RoPE scaling with q/k/v biases or q/k norm (llama.cpp reads its rope_freqs tensor "
                   "for the llama architecture only)")
    if why:
        raise VelocisError(f"this model cannot be written as GGUF: it has {'; '.join(why)}")
    return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


def _tensor_qtype(name: str, ndim: int, type: str, ncols: int, tied: bool):
    """(GGML type, fell back to F16) for a tensor of the export."""
    g = _gguf()
    T = g.GGMLQuantizationType
    if ndim == 1:
        return T.F32, False
    want = type
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if type == "q4_0" and is_output:
        want = "q8_0"
    if want in ("q8_0", "q4_0") and ncols % BLOCK:
        return T.F16, True
    return _qtype(want), False


def _file_type(type: str) -> int:
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[type]


def _default_type(model) -> str:
    dt = model.embed_tokens.weight.dtype
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dt, "f32")


def check_gguf_output(path, overwrite: bool = False, flag: str = "--output") -> Path:
    """May a GGUF file be written at `path`? A directory, an unwritable place, or an existing file
    (unless `overwrite`; and never one that is not a GGUF file) is refused. Returns the path."""
    from velocis.utils.output_dir import as_path, check_writable

    path = as_path(path, "path" if not flag.startswith("--") else flag.lstrip("-"))
    if path.is_dir():
        raise VelocisError(f"{flag} {path} is a directory; give the path of the .gguf file to write")
    if not (path.exists() or path.is_symlink()):
        check_writable(path, flag)  # its nearest existing ancestor must be a writable directory
        return path
    if not path.is_file():
        raise VelocisError(f"{flag} {path} exists and is not a regular file; choose another path")
    if not overwrite:
        hint = "--overwrite" if flag.startswith("--") else "overwrite=True"
        raise VelocisError(f"{flag} {path} already exists; choose a new path, or pass {hint} to replace it")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise VelocisError(f"{flag} {path} exists and is not a GGUF file; it is not replaced even with "
                           f"overwrite: choose another path")
    check_writable(path.parent, flag)
    return path


def _tokenizer_metadata(tokenizer, cfg: ModelConfig) -> dict[str, Any]:
    """tokenizer.* keys (gpt2-style BPE) for a velocis Tokenizer."""
    g = _gguf()
    hf = tokenizer.backend
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise VelocisError(f"the tokenizer is a {model.get('type')} model; GGUF export writes byte-level BPE only")
    pre = json.dumps(spec.get("pre_tokenizer"))
    if "ByteLevel" not in pre:
        raise VelocisError("the tokenizer is not byte-level BPE (no ByteLevel pre-tokenizer); GGUF export "
                           "writes gpt2-style byte-level BPE only")
    n_tok = tokenizer.vocab_size
    if n_tok > cfg.vocab_size:
        raise VelocisError(f"the tokenizer has {n_tok} tokens but the model's vocabulary is {cfg.vocab_size}")
    added = {i: t for i, t in hf.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        t = hf.id_to_token(i) if i < n_tok else None
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
        else:
            tokens.append(t)
            a = added.get(i)
            types.append(g.TokenType.NORMAL if a is None else
                         g.TokenType.CONTROL if a.special else g.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": merges,
        "tokenizer.huggingface.json": hf.to_str(),
    }
    return meta


def export_gguf(model, tokenizer, path: str | os.PathLike, type: str | None = None, overwrite: bool = False,
                name: str | None = None) -> dict[str, Any]:
    """Write `model` (+ `tokenizer`, a velocis Tokenizer or None) as one GGUF file llama.cpp loads.

    type: one of GGUF_TYPES; None keeps the weights' precision (f32, f16 or bf16). The file is
    written to a temporary name and renamed into place. Returns {"architecture", "type", "path",
    "f16_fallback": [tensor names written F16 because their rows are not whole blocks]}.
    """
    from velocis.model_io import require_model
    from velocis.models.rope import rope_inv_freq
    from velocis.utils.atomic import atomic_path

    require_model(model)
    if type is None:
        type = _default_type(model)
    if not isinstance(type, str) or type not in GGUF_TYPES:
        raise VelocisError(f"GGUF type {type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is not None and not hasattr(tokenizer, "backend"):
        raise VelocisError(f"tokenizer must be a velocis Tokenizer or None, got {builtins.type(tokenizer).__name__}")
    path = check_gguf_output(path, overwrite, flag="path")
    cfg = model.config
    arch = _gguf_arch(cfg)
    g = _gguf()
    K = g.Keys

    w = g.GGUFWriter(None, arch)
    w.add_name(name or "velocis")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_dim)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_file_type(int(_file_type(type)))
    if type in ("q8_0", "q4_0"):
        w.add_quantization_version(g.GGML_QUANT_VERSION)

    # RoPE
    theta, s = float(cfg.rope_theta), cfg.rope_scaling
    rope_freqs = None
    if s and s["type"] == "ntk":  # static NTK is a larger base, exactly
        d = cfg.head_dim
        theta = theta * float(s["factor"]) ** (d / (d - 2))
    elif s and s["type"] == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
    elif s and s["type"] == "yarn":
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_seq_len"]))
        for key, field in ((K.Rope.SCALING_YARN_BETA_FAST, "beta_fast"), (K.Rope.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if s.get(field) is not None:  # llama.cpp's defaults (32, 1) are transformers'
                w.add_float32(key.format(arch=arch), float(s[field]))
    elif s and s["type"] == "llama3":  # per-frequency divisors, as convert_hf_to_gguf.py writes them
        base = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        scaled, _ = rope_inv_freq(cfg.head_dim, theta, s)
        rope_freqs = (base / scaled).numpy().astype(np.float32)
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_seq_len"]))
        w.add_string(KEY_ROPE_SCALING, json.dumps(s))
    w.add_rope_freq_base(theta)

    # tokenizer
    if tokenizer is not None:
        for key, value in _tokenizer_metadata(tokenizer, cfg).items():
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_string(key, value)
    else:
        w.add_string("tokenizer.ggml.model", "none")
    ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
    if tokenizer is not None:
        for k in ids:
            ids[k] = ids[k] if ids[k] is not None else getattr(tokenizer, f"{k}_id", None)
    if ids["bos"] is not None:
        w.add_bos_token_id(int(ids["bos"]))
    if ids["eos"] is not None:
        w.add_eos_token_id(int(ids["eos"]))
    if ids["pad"] is not None:
        w.add_pad_token_id(int(ids["pad"]))
    start = cfg.prompt_start_token_id
    w.add_add_bos_token(start is not None and start == ids["bos"])
    w.add_add_eos_token(False)
    w.add_int32(KEY_PROMPT_START, -1 if start is None else int(start))

    # tensors
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    T = g.GGMLQuantizationType
    fallback = []
    for k, v in sd.items():  # one tensor at a time in float32: the peak is the model + the file's tensors
        gname = _to_gguf_name(k)
        if gname is None:
            continue  # buffers (rope inv_freq): not weights
        v = v.detach().to("cpu", torch.float32)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            v = permute_qk(v, cfg.num_heads if "attn_q" in gname else cfg.num_kv_heads)
        qtype, fell_back = _tensor_qtype(gname, v.dim(), type, v.shape[-1], cfg.tie_embeddings)
        fallback += [gname] if fell_back else []
        arr = np.ascontiguousarray(v.numpy(), dtype=np.float32)
        if qtype == T.F32:
            w.add_tensor(gname, arr)
        elif qtype == T.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, g.quants.quantize(arr, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)

    with atomic_path(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"architecture": arch, "type": type, "path": path, "f16_fallback": fallback}


def _to_gguf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if name.endswith("inv_freq"):
        return None
    raise VelocisError(f"tensor {name} has no GGUF name (is this a dense attention model?)")


def _from_gguf_name(name: str) -> str | None:
    if name in _GLOBAL_FROM_GGUF:
        return _GLOBAL_FROM_GGUF[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_FROM_GGUF:
        return f"layers.{m.group(1)}.{_LAYER_FROM_GGUF[m.group(2)]}"
    return None


# --------------------------------------------------------------------------- reading
class GGUFFile:
    """A GGUF file opened for reading: `fields` (key -> value), `tensors` (name -> ReaderTensor),
    `arch`. Damaged or non-GGUF files are VelocisErrors."""

    def __init__(self, path: str | os.PathLike):
        from velocis.utils.output_dir import as_path

        path = as_path(path, "path")
        self.path = path
        if path.is_dir():
            raise VelocisError(f"{path} is a directory; give the path of a .gguf file")
        if not path.is_file():
            raise VelocisError(f"{path}: no such GGUF file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise VelocisError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        g = _gguf()
        try:
            self.reader = g.GGUFReader(path)
            self.fields = {k: f for k, f in self.reader.fields.items()}
            self.tensors = {t.name: t for t in self.reader.tensors}
            end = max((t.data_offset + t.n_bytes for t in self.reader.tensors), default=0)
        except Exception as e:  # noqa: BLE001  (numpy/struct errors on a cut or corrupt file)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise VelocisError(f"{path} is truncated or corrupt ({type(e).__name__}: {first}); re-download "
                               f"or re-export it") from None
        if end > path.stat().st_size:
            raise VelocisError(f"{path} is truncated ({path.stat().st_size} bytes, its tensors need {end}); "
                               f"re-download or re-export it")
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=None):
        f = self.fields.get(key.format(arch=getattr(self, "arch", "")))
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001
            raise VelocisError(f"{self.path}: metadata {key} is corrupt ({type(e).__name__}: {e})") from None

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as torch, dequantized, in the PyTorch shape (GGUF lists dims innermost first)."""
        g = _gguf()
        T = g.GGMLQuantizationType
        t = self.tensors[name]
        if t.tensor_type not in _readable_types():
            raise VelocisError(f"{self.path}: tensor {name} is stored as {t.tensor_type.name}, which Velocis "
                               f"cannot read (readable: {', '.join(x.name for x in _readable_types())})")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type == T.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        elif t.tensor_type == T.F16:
            arr = np.asarray(t.data, dtype=np.float16)
        else:
            arr = dequantize(np.asarray(t.data), t.tensor_type)
        x = torch.from_numpy(np.array(arr.reshape(shape)))  # a copy: the file is memory-mapped
        return x.to(dtype)


def _readable_types():
    T = _gguf().GGMLQuantizationType
    return (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _rope_from_gguf(f: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    from velocis.models.rope import rope_inv_freq

    kind = f.get("{arch}.rope.scaling.type")
    factor = f.get("{arch}.rope.scaling.factor")
    orig = f.get("{arch}.rope.scaling.original_context_length")
    legacy = f.get("{arch}.rope.scale_linear")
    if "rope_freqs.weight" in f.tensors:
        divisors = f.tensor("rope_freqs.weight").double()
        base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
        candidates = []
        stored = f.get(KEY_ROPE_SCALING)
        if stored:
            try:
                candidates.append(json.loads(stored))
            except ValueError:
                pass
        top = float(divisors.max())
        if top > 1:  # Llama 3.1's recipe: the low/high frequency factors of Meta's release
            candidates.append({"type": "llama3", "factor": top, "original_max_seq_len": int(orig or 8192),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0})
        for s in candidates:
            if not isinstance(s, dict) or s.get("type") != "llama3" or divisors.numel() != base.numel():
                continue
            scaled = rope_inv_freq(head_dim, theta, s)[0].double()
            if torch.allclose(base / scaled, divisors, rtol=1e-4, atol=1e-6):
                return s
        raise VelocisError(f"{f.path}: its rope_freqs tensor is not a Llama-3 RoPE schedule Velocis can express")
    if kind in (None, "none"):
        if legacy and float(legacy) != 1.0:
            return {"type": "linear", "factor": _f32(legacy)}  # llama.cpp: freq_scale = 1 / scale_linear
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        for key in ("attn_factor", "yarn_log_multiplier", "yarn_attn_factor"):
            v = f.get("{arch}.rope.scaling." + key)
            if v is not None and float(v) not in (1.0, 0.0):
                raise VelocisError(f"{f.path}: YaRN with rope.scaling.{key} = {v} is not supported")
        ext = f.get("{arch}.rope.scaling.yarn_ext_factor")
        if ext is not None and float(ext) not in (-1.0, 1.0):
            raise VelocisError(f"{f.path}: YaRN with yarn_ext_factor = {ext} is not supported")
        if not orig:
            raise VelocisError(f"{f.path}: YaRN RoPE scaling without rope.scaling.original_context_length")
        s = {"type": "yarn", "factor": _f32(factor), "original_max_seq_len": int(orig)}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = f.get("{arch}.rope.scaling." + key)
            if v is not None:
                s[name] = _f32(v)
        return s
    raise VelocisError(f"{f.path}: RoPE scaling type {kind!r} is not supported (Velocis reads none, linear, yarn "
                       f"and Llama-3 rope_freqs)")


def _f32(v) -> float:
    """A float read from float32 metadata, at float32's precision (1e-5, not 9.99999974e-06)."""
    return float(f"{float(v):.7g}")


def _int(f: GGUFFile, key: str, default=None, required: bool = True):
    v = f.get(key, None)
    if v is None:
        if default is None and required:
            raise VelocisError(f"{f.path}: metadata {key.format(arch=f.arch)} is missing")
        return default
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise VelocisError(f"{f.path}: {key.format(arch=f.arch)} differs between layers ({v[:4]}...); "
                               f"Velocis models have the same shape in every layer")
        v = v[0]
    return int(v)


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig of a llama / qwen2 / qwen3 GGUF file (its metadata and tensor shapes)."""
    arch = f.arch
    if arch not in ARCHITECTURES:
        raise VelocisError(f"{f.path}: architecture {arch or 'unknown'} is not supported; Velocis reads GGUF "
                           f"{', '.join(ARCHITECTURES)} models")
    if (f.get("{arch}.expert_count") or 0) > 0 or any("_exps" in n or "ffn_gate_inp" in n for n in f.tensors):
        raise VelocisError(f"{f.path}: a mixture-of-experts {arch} model (e.g. Mixtral); Velocis reads dense GGUF "
                           f"models only")
    if "token_embd.weight" not in f.tensors:
        raise VelocisError(f"{f.path}: no token_embd.weight tensor")
    emb = [int(d) for d in f.tensors["token_embd.weight"].shape.tolist()]  # [hidden, vocab]
    hidden = _int(f, "{arch}.embedding_length")
    heads = _int(f, "{arch}.attention.head_count")
    kv = _int(f, "{arch}.attention.head_count_kv", heads)
    head_dim = _int(f, "{arch}.attention.key_length", hidden // heads)
    v_dim = _int(f, "{arch}.attention.value_length", head_dim)
    rot = _int(f, "{arch}.rope.dimension_count", head_dim)
    if v_dim != head_dim:
        raise VelocisError(f"{f.path}: value heads of {v_dim} differ from key heads of {head_dim}; not supported")
    if rot != head_dim:
        raise VelocisError(f"{f.path}: RoPE on {rot} of {head_dim} head dimensions (partial rotary) is not supported")
    theta = _f32(f.get("{arch}.rope.freq_base", 10000.0))
    n_layers = _int(f, "{arch}.block_count")
    has = lambda n: f"blk.0.{n}" in f.tensors  # noqa: E731
    qkv_bias = has("attn_q.bias")
    qk_norm = has("attn_q_norm.weight")
    if arch == "qwen2" and not qkv_bias:
        raise VelocisError(f"{f.path}: a qwen2 model without q/k/v biases")
    if qkv_bias and qk_norm:
        raise VelocisError(f"{f.path}: both q/k/v biases and q/k norm; not supported")
    for extra in ("attn_output.bias", "ffn_up.bias", "ffn_down.bias", "ffn_gate.bias"):
        if has(extra):
            raise VelocisError(f"{f.path}: has {extra}; Velocis biases q/k/v only")
    start = f.get(KEY_PROMPT_START)
    bos = f.get("tokenizer.ggml.bos_token_id")
    if start is None:  # llama.cpp's own rule: add_bos_token, else what the family does (as hf_dense)
        add_bos = f.get("tokenizer.ggml.add_bos_token")
        add_bos = (arch == "llama") if add_bos is None else bool(add_bos)
        start = bos if add_bos else None
    elif start < 0:
        start = None
    return ModelConfig(
        vocab_size=emb[1], hidden_dim=hidden, num_layers=n_layers, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, mlp_dim=_int(f, "{arch}.feed_forward_length"),
        max_seq_len=_int(f, "{arch}.context_length", 2048),
        norm_eps=_f32(f.get("{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in f.tensors, qkv_bias=qkv_bias, qk_norm=qk_norm,
        rope_theta=theta, rope_scaling=_rope_from_gguf(f, head_dim, theta),
        bos_token_id=bos, eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"), prompt_start_token_id=start)


def weights_from_gguf(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The Velocis state dict of `f` (dequantized to `dtype`; llama q/k rows un-permuted)."""
    out = {}
    unknown = []
    for name in f.tensors:
        if name == "rope_freqs.weight":
            continue  # folded into cfg.rope_scaling
        v = _from_gguf_name(name)
        if v is None:
            unknown.append(name)
            continue
        x = f.tensor(name, torch.float32)
        if f.arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
            x = unpermute_qk(x, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        out[v] = x.to(dtype)
    if unknown:
        raise VelocisError(f"{f.path}: tensors Velocis cannot place in a {f.arch} model: {unknown[:4]}"
                           f"{'...' if len(unknown) > 4 else ''}")
    return out


def _weights_dtype(f: GGUFFile) -> torch.dtype:
    """The precision the file's matrices carry: f16 / bf16 / f32 as stored; float32 for quantized."""
    T = _gguf().GGMLQuantizationType
    kinds = {t.tensor_type for n, t in f.tensors.items() if len(t.shape) >= 2}
    if kinds == {T.F16}:
        return torch.float16
    if kinds == {T.BF16}:
        return torch.bfloat16
    return torch.float32


def tokenizer_from_gguf(f: GGUFFile):
    """A velocis Tokenizer from the file's tokenizer.* keys; None when it has none (model "none")."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from velocis.tokenizer import Tokenizer

    g = _gguf()
    kind = f.get("tokenizer.ggml.model")
    if kind in (None, "none", "no_vocab"):
        return None
    if kind != "gpt2":
        what = " (SentencePiece)" if kind == "llama" else ""
        raise VelocisError(f"{f.path}: its tokenizer is tokenizer.ggml.model {kind!r}{what}, which Velocis cannot "
                           f"rebuild (it reads gpt2-style byte-level BPE); convert with --no-tokenizer to take the "
                           f"weights alone")
    tokens = f.get("tokenizer.ggml.tokens") or []
    types = f.get("tokenizer.ggml.token_type") or [int(g.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise VelocisError(f"{f.path}: {len(tokens)} tokens but {len(types)} token types")

    def named(key):
        i = f.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": named("tokenizer.ggml.bos_token_id"), "eos_token": named("tokenizer.ggml.eos_token_id"),
              "pad_token": named("tokenizer.ggml.padding_token_id")}
    n = len(tokens)  # drop the "[PAD{i}]" tokens the writer added past the tokenizer's vocabulary
    while n and types[n - 1] == g.TokenType.UNUSED and _PAD_TOKEN.fullmatch(tokens[n - 1]) \
            and int(_PAD_TOKEN.fullmatch(tokens[n - 1]).group(1)) == n - 1:
        n -= 1
    stored = f.get("tokenizer.huggingface.json")
    if stored:
        try:
            hf = HFTokenizer.from_str(stored)
        except Exception:  # noqa: BLE001  a foreign or damaged copy: rebuild from the vocabulary instead
            hf = None
        if hf is not None and hf.get_vocab_size(with_added_tokens=True) == n and \
                all(hf.id_to_token(i) == tokens[i] for i in range(n)):
            return Tokenizer(hf, config)
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise VelocisError(f"{f.path}: tokenizer pre-tokenizer {pre!r} is not supported (Velocis rebuilds "
                           f"{', '.join(sorted(PRE_TOKENIZERS))}); convert with --no-tokenizer to take the weights alone")
    split, ignore_merges = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens[:n]):
        if t in vocab:
            raise VelocisError(f"{f.path}: token {t!r} appears twice in the vocabulary (ids {vocab[t]} and {i})")
        vocab[t] = i
    merges = []
    for m in f.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise VelocisError(f"{f.path}: merge {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:  # noqa: BLE001
        raise VelocisError(f"{f.path}: cannot build a BPE tokenizer from its vocabulary ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in range(n)
               if types[i] == g.TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in range(n)
            if types[i] == g.TokenType.USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
    return Tokenizer(hf, config)


def load_gguf(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None, tokenizer: bool = True):
    """GGUF file -> (VelocisModel, tokenizer or None). dtype None: as the file's matrices are stored
    (f32/f16/bf16; float32 for quantized files)."""
    from velocis.model_io import build_model, require_dtype

    require_dtype(dtype)
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    tok = tokenizer_from_gguf(f) if tokenizer else None
    if dtype is None:
        dtype = _weights_dtype(f)
    state = weights_from_gguf(f, cfg, dtype)
    model = build_model(cfg, state, where=f"{f.path} ({f.arch})", device=device, dtype=dtype)
    return model, tok


__all__ = ["GGUF_TYPES", "ARCHITECTURES", "export_gguf", "load_gguf", "check_gguf_output", "quantize", "dequantize",
           "permute_qk", "unpermute_qk", "GGUFFile", "config_from_gguf", "weights_from_gguf", "tokenizer_from_gguf"]
