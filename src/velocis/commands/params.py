"""`velocis params --preset NAME | --model DIR | --hidden-dim ...`: parameter counts per part and
KV-cache bytes per token, computed on the meta device (no memory, any size)."""
from __future__ import annotations

import json
from pathlib import Path

from velocis.errors import VelocisError

# custom-shape flags -> ModelConfig fields
_FLAGS = [("vocab-size", int), ("hidden-dim", int), ("num-layers", int), ("num-heads", int), ("num-kv-heads", int),
          ("head-dim", int), ("mlp-dim", int), ("max-seq-len", int), ("num-experts", int),
          ("num-experts-per-token", int), ("num-shared-experts", int), ("moe-dim", int), ("first-dense-layers", int),
          ("mixer", str), ("mtp-depth", int)]


def register(sub) -> None:
    p = sub.add_parser("params", help="count parameters per part and KV-cache bytes per token")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a named preset (see `velocis params --list`)")
    src.add_argument("--model", metavar="DIR", help="a Velocis or Hugging Face model directory (reads config.json)")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--untied", action="store_true", help="untie the embedding and the output head")
    p.add_argument("--json", action="store_true", help="print JSON")
    for flag, typ in _FLAGS:
        p.add_argument(f"--{flag}", type=typ, default=None)
    p.set_defaults(func=run)


def config_from_args(args):
    from velocis.config import ModelConfig, get_preset

    overrides = {f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f, _ in _FLAGS
                 if getattr(args, f.replace("-", "_")) is not None}
    if args.untied:
        overrides["tie_embeddings"] = False
    if args.preset:
        return get_preset(args.preset, **overrides)
    if args.model:
        f = Path(args.model) / "config.json"
        if not f.is_file():
            raise VelocisError(f"--model {args.model}: no config.json there")
        d = json.loads(f.read_text(encoding="utf-8"))
        if d.get("architecture") == "velocis":
            cfg = ModelConfig.from_dict(d)
        else:
            from velocis.interop.hf import converter_for

            cfg = converter_for(d, args.model)[1].config_from_hf(d)
        return cfg.replace(**overrides) if overrides else cfg
    if not overrides:
        raise VelocisError("give --preset NAME, --model DIR or shape flags (e.g. --hidden-dim 512 --num-layers 8)")
    return ModelConfig(**overrides)


def run(args) -> int:
    from velocis.config import preset_names
    from velocis.models.count import count_params, human, human_bytes

    if args.list:
        for name in preset_names():
            print(f"{name:12s} {count_params_short(name)}")
        return 0
    cfg = config_from_args(args)
    c = count_params(cfg)
    if args.json:
        print(json.dumps(c, indent=2))
        return 0
    title = args.preset or args.model or "custom"
    print(f"{title}: {cfg.num_layers} layers, hidden {cfg.hidden_dim}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
          f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    width = max(len(k) for k in c["parts"]) + 2
    for name, n in c["parts"].items():
        note = " (tied: shared with the head)" if name == "embedding" and cfg.tie_embeddings else ""
        if name == "head" and cfg.tie_embeddings:
            note = " (tied to the embedding)"
        print(f"  {name:<{width}} {n:>16,}  {human(n):>9}  {100 * n / c['total']:5.1f}%{note}")
    print(f"  {'total':<{width}} {c['total']:>16,}  {human(c['total']):>9}")
    print(f"  activated per token (excluding the embedding lookup): {c['active']:,} ({human(c['active'])})")
    print(f"KV cache (bf16): {human_bytes(c['kv_cache_bytes_per_token'])} per token, "
          f"{human_bytes(c['kv_cache_bytes_context'])} per sequence at the full {cfg.max_seq_len}-token context")
    from velocis.models.cache_size import report_lines  # MLA vs same-width MHA/GQA caches; MTP split

    print("\n".join(report_lines(cfg)))
    return 0


def count_params_short(name: str) -> str:
    from velocis.config import get_preset
    from velocis.models.count import count_params, human

    c = count_params(get_preset(name))
    return f"{human(c['total'])} total, {human(c['active'])} activated"
