"""`velocis export --format hf --model DIR --output OUT`: a Velocis model -> a Hugging Face directory."""
from __future__ import annotations

from velocis.errors import VelocisError


def register(sub) -> None:
    from velocis.commands.convert import OVERWRITE_HELP

    p = sub.add_parser("export", help="export a Velocis model (e.g. to a Hugging Face directory)")
    p.add_argument("--format", default="hf", help="output format: hf")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model or run directory")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="Hugging Face directory to write (new, empty, or a previous export's)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from velocis.interop.hf import HF_FILES, export_hf
    from velocis.model_io import is_velocis_dir, load_model_dir
    from velocis.utils.output_dir import check_not_input, check_output_dir, config_kind

    if args.format != "hf":
        raise VelocisError(f"--format {args.format!r} is not supported; use --format hf")
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
