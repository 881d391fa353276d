"""`velocis convert --from-hf IN --output OUT`: a Hugging Face directory -> a Velocis model directory.
`velocis convert --from-gguf F.gguf --output OUT`: a llama.cpp GGUF file (llama / qwen2 / qwen3) -> the same."""
from __future__ import annotations

OVERWRITE_HELP = ("write into --output even if it holds other files (only the model's own files are "
                  "replaced; nothing else is deleted)")


def register(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face model directory (Llama, Qwen2/3, Mistral, ...) "
                                       "or a GGUF file (llama.cpp llama, qwen2, qwen3)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF directory: config.json + safetensors (+ tokenizer)")
    src.add_argument("--from-gguf", metavar="FILE",
                     help="GGUF file (f32/f16/bf16/q8_0/q4_0 and k-quant tensors are dequantized)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="Velocis model directory to write (new, empty, or a previous conversion's)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as in the checkpoint; float32 for a quantized GGUF)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="convert the weights alone (e.g. a GGUF whose SentencePiece vocabulary Velocis cannot rebuild)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from velocis.model_io import MODEL_FILES, is_velocis_dir, save_model
    from velocis.utils.output_dir import check_not_input, check_output_dir

    source = args.from_hf if args.from_hf is not None else args.from_gguf
    flag = "--from-hf" if args.from_hf is not None else "--from-gguf"
    # --output first: a refusal must come before minutes of loading, not after
    check_not_input(args.output, source, flag)
    check_output_dir(args.output, MODEL_FILES, "a Velocis model", args.overwrite, is_own=is_velocis_dir)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.from_hf is not None:
        from velocis.interop.hf import load_hf

        model, tok = load_hf(args.from_hf, device="cpu")
    else:
        from velocis.interop.gguf import load_gguf

        model, tok = load_gguf(args.from_gguf, device="cpu", dtype=dtype, tokenizer=not args.no_tokenizer)
    if args.no_tokenizer:
        tok = None
    if dtype is None:  # keep the checkpoint's precision (load_hf keeps tensors as stored)
        dtype = model.embed_tokens.weight.dtype
    save_model(model, tok, args.output, dtype=dtype, overwrite=args.overwrite)
    n = model.num_params()
    print(f"converted {source} -> {args.output} ({n / 1e6:.1f}M parameters, "
          f"{'with' if tok is not None else 'no'} tokenizer)")
    return 0
