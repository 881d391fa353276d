"""`velocis export --format hf --model DIR --output OUT`: a Velocis model -> a Hugging Face directory.
`velocis export --format gguf [--type f32|f16|bf16|q8_0|q4_0] --model DIR --output F.gguf`: -> one GGUF file
for llama.cpp (velocis/interop/gguf.py)."""
from __future__ import annotations

from velocis.errors import VelocisError

FORMATS = ("hf", "gguf")


def register(sub) -> None:
    from velocis.commands.convert import OVERWRITE_HELP

    p = sub.add_parser("export", help="export a Velocis model (a Hugging Face directory, or a GGUF file for llama.cpp)")
    p.add_argument("--format", default="hf", help="output format: hf (a directory) or gguf (one file)")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model or run directory")
    p.add_argument("--output", required=True, metavar="PATH",
                   help="hf: the directory to write (new, empty, or a previous export's); gguf: the .gguf file")
    p.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP + "; gguf: replace an existing GGUF file at --output")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="hf: store weights in this dtype")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help="gguf: tensor type f32, f16, bf16, q8_0 or q4_0 (default: the model's precision); "
                        "norms stay f32, q4_0 keeps the output projection in q8_0")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.format != "hf":
        raise VelocisError(f"--format {args.format!r} is not supported; use --format {' or '.join(FORMATS)}")
    if args.type is not None:
        raise VelocisError("--type is for --format gguf; for --format hf use --dtype")
    import torch

    from velocis.interop.hf import HF_FILES, export_hf
    from velocis.model_io import is_velocis_dir, load_model_dir
    from velocis.utils.output_dir import check_not_input, check_output_dir, config_kind

    # --output first: a refusal must come before loading the model, not after
    check_not_input(args.output, args.model, "--model")
    check_output_dir(args.output, HF_FILES, "a Hugging Face model", args.overwrite,
                     is_own=lambda d: config_kind(d) == "hf")
    if not is_velocis_dir(args.model):
        raise VelocisError(f"--model {args.model}: not a Velocis model directory (no Velocis config.json)")
    model, tok = load_model_dir(args.model, device="cpu")
    arch = export_hf(model, tok, args.output, dtype=getattr(torch, args.dtype) if args.dtype else None,
                     overwrite=args.overwrite)
    print(f"exported {args.model} -> {args.output} ({arch})")
    return 0


def _run_gguf(args) -> int:
    from pathlib import Path

    from velocis.interop.gguf import GGUF_TYPES, check_gguf_output, export_gguf
    from velocis.model_io import is_velocis_dir, load_model_dir

    if args.dtype is not None:
        raise VelocisError("--dtype is for --format hf; for --format gguf use --type "
                           f"({', '.join(GGUF_TYPES)})")
    if args.type is not None and args.type not in GGUF_TYPES:
        raise VelocisError(f"--type {args.type!r} is not a GGUF type Velocis writes; choose one of "
                           f"{', '.join(GGUF_TYPES)}")
    # --output first: a refusal must come before loading the model, not after
    check_gguf_output(args.output, args.overwrite)
    if not is_velocis_dir(args.model):
        raise VelocisError(f"--model {args.model}: not a Velocis model directory (no Velocis config.json)")
    model, tok = load_model_dir(args.model, device="cpu")
    info = export_gguf(model, tok, args.output, type=args.type, overwrite=args.overwrite,
                       name=Path(args.model).resolve().name)
    note = ""
    if info["f16_fallback"]:
        note = (f"; {len(info['f16_fallback'])} tensors kept in f16 (rows not a multiple of 32: "
                f"{', '.join(info['f16_fallback'][:3])}{', ...' if len(info['f16_fallback']) > 3 else ''})")
    print(f"exported {args.model} -> {args.output} (GGUF {info['architecture']}, {info['type']}, "
          f"{'with' if tok is not None else 'no'} tokenizer{note})")
    return 0
