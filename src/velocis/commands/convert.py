"""`velocis convert --from-hf IN --output OUT`: a Hugging Face directory -> a Velocis model directory."""
from __future__ import annotations

OVERWRITE_HELP = ("write into --output even if it holds other files (only the model's own files are "
                  "replaced; nothing else is deleted)")


def register(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face model directory (Llama, Qwen2/3, Mistral, ...)")
    p.add_argument("--from-hf", required=True, metavar="DIR", help="HF directory: config.json + safetensors (+ tokenizer)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="Velocis model directory to write (new, empty, or a previous conversion's)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as in the checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from velocis.interop.hf import load_hf
    from velocis.model_io import MODEL_FILES, is_velocis_dir, save_model
    from velocis.utils.output_dir import check_not_input, check_output_dir

    # --output first: a refusal must come before minutes of loading, not after
    check_not_input(args.output, args.from_hf, "--from-hf")
    check_output_dir(args.output, MODEL_FILES, "a Velocis model", args.overwrite, is_own=is_velocis_dir)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load_hf(args.from_hf, device="cpu")
    if dtype is None:  # keep the checkpoint's precision (load_hf keeps tensors as stored)
        dtype = model.embed_tokens.weight.dtype
    save_model(model, tok, args.output, dtype=dtype, overwrite=args.overwrite)
    n = model.num_params()
    print(f"converted {args.from_hf} -> {args.output} ({n / 1e6:.1f}M parameters, "
          f"{'with' if tok is not None else 'no'} tokenizer)")
    return 0
