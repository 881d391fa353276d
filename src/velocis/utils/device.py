"""Devices, dtypes and precision: the one place every command and API call resolves them.

    resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | torch.device | None) -> torch.device
    default_dtype(device)             fp32 on CPU, bf16 on a GPU that has it (inference weights)
    resolve_precision(p, device)      "auto" -> "bf16" where matmuls have bf16 hardware, else "fp32"
    autocast_for(device, precision)   the training forward's context
"""
from __future__ import annotations

import contextlib

import torch

from velocis.errors import VelocisError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VelocisError(f"device {device!r} is unknown; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VelocisError(f"device {device}: CUDA is not available here; use cpu (--device cpu)")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise VelocisError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on a GPU that supports it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def hardware_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 matrices natively (faster than fp32, not emulated)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # AVX512-BF16 (Zen 4, Cooper Lake+) or AMX (Sapphire Rapids+)
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if hardware_bf16(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast keeps fp32 master weights and optimizer state; "fp32" runs plain."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
