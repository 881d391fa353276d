"""LoRA: low-rank adapters on a model's projections, the base weights frozen.

    names = apply_lora(model, rank=8)           # q/k/v/o + gate/up/down projections get adapters
    ...train: only lora_A / lora_B have requires_grad...
    save_adapters(model, out_dir)               # adapter_model.safetensors + adapter_config.json (PEFT's names)
    merge_lora(model)                           # fold B @ A * alpha / r into the weights, drop the adapters

A wrapped projection computes base(x) + dropout(x) A^T B^T * alpha / r with A [r, in] random
(Kaiming, as PEFT) and B [out, r] zero, so a fresh adapter leaves the model's output unchanged.
The model's state dict keeps the base weight under its own name (`...q_proj.weight`) and adds
`...q_proj.lora_A` / `...q_proj.lora_B`: a training checkpoint holds both and resumes exactly.
What a run exports as its model dir is the merged model (`merged_model`), which every other
command loads as an ordinary model.

For the commands (sft, dpo, grpo): `add_lora_arguments(parser)` adds --lora-rank / --lora-alpha /
--lora-targets / --lora-dropout, and `lora_trainer_hooks(args)` gives the Trainer the two hooks
(prepare_model: add the adapters after the starting weights are loaded; export_model: merge for
the run's model dir), or nothing without --lora-rank.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear, linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Projections whose weight the model reads directly instead of calling the module: an adapter there
# would be skipped, so they are refused.
_READ_DIRECTLY = {
    "lm_head": "the loss reads lm_head.weight directly",
    "embed_tokens": "an embedding is not a projection",
    "kv_b_proj": "MLA's absorbed decoding reads kv_b_proj.weight directly",
}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. Deliberately not an nn.Linear: code
    that takes any nn.Linear's weight as the whole layer (the C++ decode path, quantization) must
    not see this one as a plain projection and drop the adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of A
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # lora_disabled(): the base model's output, e.g. for a reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + B A * alpha / r, computed in fp32, in the weight's dtype."""
        delta = self.lora_B.float() @ self.lora_A.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
               targets: tuple[str, ...] | list[str] | None = None, dropout: float = 0.0) -> nn.Module:
    """Freeze every parameter of `model` and wrap each linear layer whose name is, or ends with, one
    of `targets` in a LoRALinear (in place; returns the model). alpha defaults to 2 * rank.
    targets None: those of DEFAULT_TARGETS the model has (an MLA or MoE model lacks some); named
    targets must each match."""
    if not isinstance(rank, int) or rank <= 0:
        raise VelocisError(f"LoRA rank (--lora-rank) must be a positive integer, got {rank!r}")
    alpha = float(2 * rank if alpha is None else alpha)
    if not alpha > 0:
        raise VelocisError(f"LoRA alpha (--lora-alpha) must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise VelocisError(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {dropout}")
    strict = targets is not None
    targets = [t.strip() for t in (DEFAULT_TARGETS if targets is None else targets) if t.strip()]
    if not targets:
        raise VelocisError("--lora-targets is empty; name projections such as q_proj,v_proj")
    if has_lora(model):
        raise VelocisError("the model already has LoRA adapters; merge_lora() it before adding new ones")
    for t in targets:
        last = t.rsplit(".", 1)[-1]
        if last in _READ_DIRECTLY:
            raise VelocisError(f"--lora-targets {t}: {_READ_DIRECTLY[last]}, so an adapter there would be skipped; "
                               f"choose among {', '.join(DEFAULT_TARGETS)}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for t in targets:
        hits = [name for name, m in model.named_modules() if name and _matches(name, t)]
        if not hits and strict:
            known = sorted({n.rsplit(".", 1)[-1] for n in linears if n.rsplit(".", 1)[-1] not in _READ_DIRECTLY})
            raise VelocisError(f"--lora-targets {t} names no module of this model; its projections are "
                               f"{', '.join(known)}")
        for name in hits:
            if name not in linears:
                kind = type(model.get_submodule(name)).__name__
                raise VelocisError(f"--lora-targets {t}: {name} is a {kind}, not a linear layer (a quantized "
                                   f"model cannot take adapters; use the float one)")
            chosen[name] = linears[name]
    if not chosen:
        raise VelocisError(f"none of the projections {', '.join(targets)} is in this model; name its own with "
                           f"--lora-targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in chosen.items():
        model.set_submodule(name, LoRALinear(base, rank, alpha, dropout))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain linear layer back (in place; returns the
    model). The merged weights are new tensors: the old base weights are not written to."""
    for name, m in lora_modules(model).items():
        with torch.device("meta"):
            plain = Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        if m.bias is not None:
            plain.bias = m.bias
        model.set_submodule(name, plain)
    return model


def merged_model(model: nn.Module) -> nn.Module:
    """A merged twin of a LoRA model for export (the model itself when it has no adapters): it shares
    every tensor but the merged weights, so the trained model is untouched and little memory is used."""
    if not has_lora(model):
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared)
    return merge_lora(twin)


class lora_disabled:
    """`with lora_disabled(model):` the base model's output (adapters off), e.g. for a reference."""

    def __init__(self, model: nn.Module):
        self.mods = list(lora_modules(model).values())

    def __enter__(self):
        self.before = [m.enabled for m in self.mods]
        for m in self.mods:
            m.enabled = False
        return self

    def __exit__(self, *exc):
        for m, e in zip(self.mods, self.before):
            m.enabled = e
        return False


# --- files: adapter_model.safetensors + adapter_config.json (PEFT's names) -----------------------------
_PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the model's own state-dict names (`<module>.lora_A` / `.lora_B`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def save_adapters(model: nn.Module, out_dir: str | Path, base_model: str = "") -> Path:
    """Write the adapters beside a model dir: adapter_model.safetensors (keys as PEFT writes them,
    base_model.model.<module>.lora_A.weight) and adapter_config.json; each file atomically."""
    from safetensors.torch import save

    from velocis.utils.atomic import atomic_write_bytes, atomic_write_text

    mods = lora_modules(model)
    if not mods:
        raise VelocisError("the model has no LoRA adapters to save (apply_lora first)")
    first = next(iter(mods.values()))
    tensors = {}
    for name, m in mods.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": sorted(mods),
        "bias": "none",
        "base_model_name_or_path": str(base_model),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapters saved in `adapter_dir` to `model` (a base model of the same shape), in place."""
    from velocis.model_io import read_safetensors

    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not (cfg_file.is_file() and weights.is_file()):
        raise VelocisError(f"{adapter_dir}: no LoRA adapters here (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as e:
        raise VelocisError(f"{cfg_file}: not a LoRA adapter config ({e})") from None
    tensors = read_safetensors(weights)
    names = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    if has_lora(model):
        raise VelocisError("the model already has LoRA adapters; load adapters into a base model")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise VelocisError(f"{weights}: adapters for {missing[:3]}, which this model does not have; "
                           f"load them into the model they were trained on")
    apply_lora(model, rank, alpha, targets=names, dropout=float(config.get("lora_dropout") or 0.0))
    got = lora_modules(model)
    for name in names:
        m = got[name]
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            t = tensors.get(f"{_PEFT_PREFIX}{name}.{part}.weight")
            if t is None or tuple(t.shape) != tuple(param.shape):
                shape = None if t is None else tuple(t.shape)
                raise VelocisError(f"{weights}: {name}.{part} is {shape}, the model needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(t)
    return model


# --- the commands' flags --------------------------------------------------------------------------
@dataclass
class LoRASettings:
    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None  # None: DEFAULT_TARGETS the model has
    dropout: float = 0.0


def add_lora_arguments(parser) -> None:
    """--lora-rank R (off by default: full fine-tuning), --lora-alpha, --lora-targets, --lora-dropout."""
    g = parser.add_argument_group("LoRA (train adapters, base frozen; the run's model dir is the merged model)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R", help="train rank-R adapters instead of "
                   "all weights (default off)")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / R (default alpha = 2R)")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help=f"comma-separated projection names to adapt (default those of {','.join(DEFAULT_TARGETS)} "
                        f"the model has)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")


def lora_settings(args) -> LoRASettings | None:
    """The LoRA flags as settings, None without --lora-rank (flags that need it are refused alone)."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        if (getattr(args, "lora_alpha", None) is not None or getattr(args, "lora_dropout", 0.0)
                or getattr(args, "lora_targets", None) is not None):
            raise VelocisError("--lora-alpha / --lora-targets / --lora-dropout need --lora-rank R")
        return None
    given = getattr(args, "lora_targets", None)
    targets = None if given is None else tuple(t.strip() for t in str(given).split(",") if t.strip())
    settings = LoRASettings(rank, args.lora_alpha, targets, args.lora_dropout)
    # the numbers are checked now, before any slow loading
    if rank <= 0:
        raise VelocisError(f"--lora-rank must be a positive integer, got {rank}")
    if settings.alpha is not None and not settings.alpha > 0:
        raise VelocisError(f"--lora-alpha must be positive, got {settings.alpha}")
    if not 0 <= settings.dropout < 1:
        raise VelocisError(f"--lora-dropout must be in [0, 1), got {settings.dropout}")
    if targets is not None and not targets:
        raise VelocisError("--lora-targets is empty; name projections such as q_proj,v_proj")
    return settings


def maybe_apply_lora(model: nn.Module, args) -> nn.Module:
    """apply_lora with the command's flags; the model unchanged without --lora-rank."""
    s = lora_settings(args)
    if s is None:
        return model
    return apply_lora(model, s.rank, s.alpha, s.targets, s.dropout)


def lora_trainer_hooks(args) -> dict:
    """Trainer keyword arguments for the LoRA flags: {} without --lora-rank, else prepare_model (adds the
    adapters after the starting weights are loaded) and export_model (the run's model dir is merged)."""
    if lora_settings(args) is None:
        return {}

    def prepare(model):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # the trainer wraps the model for DDP / FSDP before this hook: adapters added after it would
            # not be synchronised or sharded
            raise VelocisError("LoRA (--lora-rank) runs in one process for now; launch without torchrun, or "
                               "fine-tune all weights")
        return maybe_apply_lora(model, args)

    return {"prepare_model": prepare, "export_model": merged_model}
