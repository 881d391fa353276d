"""Causal self-attention for CPU training: a small C++ extension (csrc/attention_cpu.cpp).

Reference (what the tests hold it to):

    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

PyTorch's CPU flash kernel tiles both queries and keys and pays per-tile overhead; this one takes
each (batch, head) on one thread, keeps a 64-query-row block of scores in cache between the QK^T
gemm, the softmax and the PV gemm, and calls the BLAS PyTorch itself links once per block. The
backward recomputes probabilities from the saved log-sum-exp, as flash attention does. fp32 only;
a third faster than SDPA at the micro preset's shapes (benchmarks/RESULTS.md).

The extension is compiled on first use (~15 s, cached in torch's extension directory, keyed by
this CPU and torch version since it is built with -march=native). Without a C++ compiler, with a
PyTorch build that does not export the BLAS, or with VELOCIS_CPU_KERNELS=0, `available()` is
False and attention uses SDPA.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "attention_cpu.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" once loaded, or "error"


def _cpu_fingerprint() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    key = f"{platform.machine()} {platform.processor()} {flags} {torch.__version__}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _load():
    from torch.utils import cpp_extension

    # `ninja` from the ninja wheel sits beside this interpreter even when its bin/ is not on PATH
    bin_dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        bin_dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(bin_dirs + [os.environ.get("PATH", "")])
    name = f"velocis_cpu_{_cpu_fingerprint()}"
    if not (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists():
        print("velocis: compiling the CPU attention kernel (once per machine, ~15 s)…", file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(_SOURCE)],
                       extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], is_python_module=False)
    return torch.ops.velocis_cpu


def ops():
    """The loaded ops, building them on first call; None where they cannot be built."""
    if "ops" in _state or "error" in _state:
        return _state.get("ops")
    with _lock:
        if "ops" not in _state and "error" not in _state:
            if os.environ.get("VELOCIS_CPU_KERNELS", "1") == "0":
                _state["error"] = "disabled by VELOCIS_CPU_KERNELS=0"
            else:
                try:
                    _state["ops"] = _load()
                except Exception as e:  # no compiler, no ninja, no exported BLAS: SDPA still works
                    _state["error"] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"Velocis CPU attention kernel unavailable, using SDPA ({_state['error'][:300]})",
                                  stacklevel=3)
    return _state.get("ops")


def available() -> bool:
    return ops() is not None


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scale = 1.0 / math.sqrt(q.shape[-1])
        o, lse = ops().causal_attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        return ops().causal_attention_bwd(q, k, v, o, lse, dout.contiguous(), ctx.scale)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel takes: fp32 CPU, [B, heads, T, D] with one D for q, k and v."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and q.dim() == 4
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and k.shape == v.shape and q.shape[2] == k.shape[2]
            and q.shape[1] % k.shape[1] == 0 and not torch.compiler.is_compiling() and available())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, T, D] (H a multiple of KV) -> [B, H, T, D]; call `supports` first."""
    return _CausalAttention.apply(q, k, v)
