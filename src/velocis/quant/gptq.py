"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"; the AutoGPTQ algorithm): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction error ||X W^T - X Q^T||^2, H = X^T X over the calibration tokens.

    H += damp * mean(diag H) * I                                  (dampening, damp = 0.01)
    U = cholesky(H^-1, upper)                                      (the rows of the inverse the update needs)
    for each block of `block_size` columns, for each column j:
        at a group's first column: scale / zero point from the group's current (updated) weights
        q_j = quant(w_j);  e = (w_j - q_j) / U[j, j]
        W[:, j:] -= e U[j, j:]                                     (inside the block; lazily after it)

Differences from AutoGPTQ, on purpose: a group's scale comes from its weights *with* the updates
of the earlier columns of the same block (AutoGPTQ reads them before those updates when the group
is narrower than the block); columns whose input is always zero on the calibration data keep their
weights (AutoGPTQ zeroes them: an input the calibration never saw is not proof it is always zero);
no act-order (its permutation does not mix with fixed groups without "static groups").

The model is quantized block by block (decoder layer by layer, "sequential"): the calibration
sequences are embedded, each block's inputs are those produced by the already-quantized blocks
before it, and inside a block the projections are quantized in the order they run ("true
sequential": q/k/v together (they read one tensor), then o, then gate/up, then down; found by
which modules read the same input tensor), each group's Hessian collected with the earlier groups
already quantized. MoE routed experts: per expert, the Hessian of its gate/up from the tokens
routed to it, of its down projection from those tokens' activations through the float gate/up; an
expert no calibration token reached is rounded to nearest. What lies outside the decoder blocks
(the untied head, int8 per row; the MTP modules) is rounded to nearest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.models.moe import Experts
from velocis.models.positions import Positions
from velocis.quant.formats import QSpec, QTensor, codes, group_params, pack, pad_columns, quantize_rtn, spec_for
from velocis.quant.linear import quantize_module


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QSpec, damp: float = 0.01,
                         block_size: int = 128) -> QTensor:
    """GPTQ one weight [out, in] given H = sum of x x^T [in, in] over its calibration inputs."""
    in_f = weight.shape[1]
    W = pad_columns(weight.detach().float().clone(), spec)
    n = W.shape[1]
    H = torch.zeros(n, n, dtype=torch.float64, device=W.device)
    H[:in_f, :in_f] = hessian.to(torch.float64)
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0  # padding columns, and inputs the calibration never excited: plain rounding there
    diag += damp * diag.mean()
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except RuntimeError:
        raise VelocisError("GPTQ: the Hessian is not positive definite even after damping; raise --damp "
                           "(e.g. 0.1) or give more calibration text") from None
    g = spec.group_size or n
    block = max(g, (block_size // g) * g) if spec.group_size else block_size
    groups = n // g if spec.group_size else 1
    Q = torch.zeros_like(W)
    S = torch.zeros(W.shape[0], groups, device=W.device)
    Z = torch.zeros_like(S)
    if spec.group_size is None:  # per channel: one scale per row, from the whole row
        s, z = group_params(W.unsqueeze(1), spec)
        S, Z = s, z
        scale, zero = s[:, 0], z[:, 0]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.group_size and col % g == 0:  # the group lies inside this block (block % g == 0)
                s, z = group_params(W1[:, i:i + g].unsqueeze(1), spec)
                S[:, col // g], Z[:, col // g] = s[:, 0], z[:, 0]
                scale, zero = s[:, 0], z[:, 0]
            w = W1[:, i]
            q = codes(w, scale, zero, spec)
            Q[:, col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return pack(Q, S, Z, spec, in_f)


class _Hessians:
    """Forward hooks that sum x x^T over the inputs of the watched modules."""

    def __init__(self):
        self.h: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.first_input: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.handles = []

    def _add(self, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if key not in self.h:
            self.h[key] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.count[key] = 0
        self.h[key].addmm_(x.t(), x)
        self.count[key] += x.shape[0]

    def watch(self, name: str, m: nn.Module) -> None:
        def linear_hook(mod, args, out):
            self._seen(name, args[0])
            self._add(name, args[0])

        def experts_hook(mod, args, out):
            x, _, indices = args[:3]
            self._seen(name, x)
            inner = mod.down_proj.shape[-1]
            for e in range(mod.gate_up_proj.shape[0]):
                rows = (indices == e).any(-1)
                if not bool(rows.any()):
                    continue
                xe = x[rows].float()
                self._add(f"{name}#gate_up#{e}", xe)
                h = xe @ mod.gate_up_proj[e].float().t()
                self._add(f"{name}#down#{e}", F.silu(h[:, :inner]) * h[:, inner:])

        self.handles.append(m.register_forward_hook(experts_hook if isinstance(m, Experts) else linear_hook))

    def _seen(self, name: str, x: torch.Tensor) -> None:
        if name not in self.first_input:  # the first batch: call order, and which modules share an input
            self.first_input[name] = x
            self.order.append(name)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _run(block: nn.Module, xs: list[torch.Tensor], pos: Positions) -> list[torch.Tensor]:
    return [block(x, pos, None)[0] for x in xs]


@torch.no_grad()
def gptq_quantize(model: nn.Module, q: dict, calibration: torch.Tensor, damp: float = 0.01, block_size: int = 128,
                  batch_size: int = 8, progress=None) -> None:
    """Quantize (in place) the modules `q["modules"]` names with GPTQ on `calibration` token ids [N, T]."""
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and calibration.numel()):
        raise VelocisError("GPTQ calibration must be token ids, a LongTensor [sequences, tokens]")
    if not 0 < damp < 10:
        raise VelocisError(f"GPTQ damp must be a small positive fraction such as 0.01, got {damp}")
    dev = next(model.parameters()).device
    ids = calibration.to(dev)
    T = ids.shape[1]
    if T > model.config.max_seq_len:
        raise VelocisError(f"calibration sequences of {T} tokens exceed the model's context "
                           f"({model.config.max_seq_len})")
    pos = Positions(torch.arange(T, device=dev), None, T)
    xs = [model.embed_tokens(ids[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
    todo = list(q["modules"])
    for li, block in enumerate(model.layers):
        prefix = f"layers.{li}."
        remaining = [n for n in todo if n.startswith(prefix)]
        while remaining:
            hs = _Hessians()
            for name in remaining:
                hs.watch(name, model.get_submodule(name))
            try:
                _run(block, xs, pos)
            finally:
                hs.remove()
            if not hs.order:  # nothing watched ran (e.g. a part this input never reaches): round them
                for name in remaining:
                    quantize_module(model, name, spec_for(q, name))
                break
            first = hs.first_input[hs.order[0]]
            group = [n for n in hs.order if hs.first_input[n] is first]
            for name in group:
                _quantize_one(model, name, spec_for(q, name), hs, damp, block_size)
                if progress:
                    progress(name)
            remaining = [n for n in remaining if n not in group]
        todo = [n for n in todo if not n.startswith(prefix)]
        xs = _run(block, xs, pos)
    for name in todo:  # outside the decoder blocks: the untied head, the MTP modules
        quantize_module(model, name, spec_for(q, name))
        if progress:
            progress(name)


def _quantize_one(model: nn.Module, name: str, spec: QSpec, hs: _Hessians, damp: float, block_size: int) -> None:
    m = model.get_submodule(name)
    if isinstance(m, Experts):
        gu, dn = [], []
        for e in range(m.gate_up_proj.shape[0]):
            for key, w, out in ((f"{name}#gate_up#{e}", m.gate_up_proj[e], gu),
                                (f"{name}#down#{e}", m.down_proj[e], dn)):
                h = hs.h.get(key)
                out.append(quantize_rtn(w, spec) if h is None else gptq_quantize_weight(w, h, spec, damp, block_size))
        quantize_module(model, name, spec, (_stack(gu), _stack(dn)))
    else:
        qt = gptq_quantize_weight(m.weight, hs.h[name], spec, damp, block_size)
        quantize_module(model, name, spec, qt)


def _stack(qts: list[QTensor]) -> QTensor:
    """Per-expert QTensors -> one with a leading expert dimension."""
    zeros = None if qts[0].zeros is None else torch.stack([t.zeros for t in qts])
    return QTensor(torch.stack([t.qweight for t in qts]), torch.stack([t.scales for t in qts]), zeros,
                   qts[0].spec, qts[0].in_features)


def load_calibration(path, tokenizer, num_sequences: int = 128, seq_len: int = 512) -> torch.Tensor:
    """Calibration token ids [N, seq_len] from a text file, tokenized with the model's tokenizer.

    Documents are the file's blank-line-separated paragraphs, each followed by EOS (as the training
    data packs them); the token stream is cut into seq_len windows, and N of them are taken evenly
    spaced over the file (the first ~16 * N * seq_len characters are read). A file shorter than one
    window gives one shorter sequence (at least 32 tokens)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise VelocisError(f"--calibration {path}: no such file; give a text file in the model's language")
    if not (isinstance(num_sequences, int) and 0 < num_sequences <= 1024):
        raise VelocisError(f"calibration sequences must be in 1..1024, got {num_sequences!r}")
    if not (isinstance(seq_len, int) and seq_len >= 32):
        raise VelocisError(f"calibration sequence length must be at least 32 tokens, got {seq_len!r}")
    limit = 16 * num_sequences * seq_len
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(limit)
    except UnicodeDecodeError as e:
        raise VelocisError(f"--calibration {path}: not UTF-8 text ({e})") from None
    docs = [d for d in (p.strip() for p in text.split("\n\n")) if d]
    eos = getattr(tokenizer, "eos_id", None)
    stream: list[int] = []
    for ids in tokenizer.encode_batch(docs) if docs else []:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    if len(stream) < 32:
        raise VelocisError(f"--calibration {path}: only {len(stream)} tokens of text; GPTQ needs at least 32 "
                           f"(a few hundred sequences of the model's context is plenty)")
    seq_len = min(seq_len, len(stream))
    windows = len(stream) // seq_len
    n = min(num_sequences, windows)
    starts = [round(i * (windows - 1) / max(n - 1, 1)) * seq_len for i in range(n)] if n > 1 else [0]
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)
