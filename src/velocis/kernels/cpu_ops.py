"""The C++ CPU kernels (csrc/*.cpp), compiled on first use: an fp32 GEMM (AVX2 + FMA CPUs), causal
attention, RMSNorm, SwiGLU, RoPE and the cross-entropy of a chunk of logits.

Built once per machine (~30 s, cached in torch's extension directory under a name keyed by this
CPU, torch version and the sources, since it is compiled with -march=native). Without a C++
compiler or ninja, with a PyTorch build that does not export its BLAS, or with
VELOCIS_CPU_KERNELS=0, `ops()` is None and every caller takes its plain-PyTorch path.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" once loaded, or "error"


def _build_key() -> str:
    """This CPU (the build is -march=native), this torch, these sources: two Velocis versions
    side by side never load each other's build."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    key = hashlib.sha1(f"{platform.machine()} {platform.processor()} {flags} {torch.__version__}".encode())
    for p in _SOURCES + sorted(_CSRC.glob("*.h")):  # headers too: a changed one must rebuild
        key.update(p.read_bytes())
    return key.hexdigest()[:10]


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
    name = f"velocis_cpu_{_build_key()}"
    built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    if not built.exists():
        print("velocis: compiling the CPU kernels (once per machine and version, ~30 s)…", file=sys.stderr, flush=True)
    import fcntl

    # torch's build lock is a plain file that a killed build leaves behind, after which every later
    # load waits on it forever. Builds of this name take an flock first (the kernel drops it when its
    # holder dies): whoever holds the flock knows a `lock` file left there is stale and removes it.
    with open(built.parent / "velocis-build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (built.parent / "lock").unlink(missing_ok=True)
        cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], is_python_module=False)
    return torch.ops.velocis_cpu


def ops():
    """torch.ops.velocis_cpu, building it on first call; None where it cannot be built."""
    if "ops" in _state or "error" in _state:
        return _state.get("ops")
    with _lock:
        if "ops" not in _state and "error" not in _state:
            if os.environ.get("VELOCIS_CPU_KERNELS", "1") == "0":
                _state["error"] = "disabled by VELOCIS_CPU_KERNELS=0"
            else:
                try:
                    _state["ops"] = _load()
                except Exception as e:  # no compiler, no ninja, no exported BLAS: the plain paths still work
                    _state["error"] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"Velocis CPU kernels unavailable, using plain PyTorch ({_state['error'][:300]})",
                                  stacklevel=3)
    return _state.get("ops")


def available() -> bool:
    return ops() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Are these CPU fp32 tensors outside torch.compile (which fuses the plain paths itself), with the ops built?"""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and available())
