"""`velocis convert --from-hf IN --output OUT`: a Hugging Face directory -> a Velocis model directory."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face model directory (Llama, Qwen2/3, Mistral, ...)")
    p.add_argument("--from-hf", required=True, metavar="DIR", help="HF directory: config.json + safetensors (+ tokenizer)")
    p.add_argument("--output", required=True, metavar="DIR", help="Velocis model directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as in the checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from velocis.interop.hf import load_hf
    from velocis.model_io import save_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load_hf(args.from_hf, device="cpu")
    if dtype is None:  # keep the checkpoint's precision (load_hf keeps tensors as stored)
        dtype = model.embed_tokens.weight.dtype
    save_model(model, tok, args.output, dtype=dtype)
    n = model.num_params()
    print(f"converted {args.from_hf} -> {args.output} ({n / 1e6:.1f}M parameters, "
          f"{'with' if tok is not None else 'no'} tokenizer)")
    return 0
