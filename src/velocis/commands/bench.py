"""`velocis bench decode --model DIR`: batch-1 greedy decoding speed; the last line is `tokens/s: X`.

Loads the model (optionally quantizing it in memory, round-to-nearest: int8 per output channel, int4
in groups of 32 with zero points), decodes a few tokens to warm up, then times --rounds greedy
generations of --new-tokens after a --prompt-tokens prompt (prefill included, as a user waits for
it) and reports the median. The side-by-side comparison with transformers and llama.cpp is
benchmarks/bench_decode_cpu.py.
"""
from __future__ import annotations

import statistics
import time

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure speed (decode: batch-1 greedy tokens/s)")
    what = p.add_subparsers(dest="bench_command", metavar="WHAT")
    what.required = True
    d = what.add_parser("decode", help="batch-1 greedy decode tokens/s")
    d.add_argument("--model", required=True, metavar="DIR", help="Velocis model / run dir, Hugging Face dir or .gguf")
    d.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize in memory first (int8 per channel, int4 g32; a quantized model dir needs none)")
    d.add_argument("--new-tokens", type=int, default=128, metavar="N")
    d.add_argument("--prompt-tokens", type=int, default=16, metavar="N")
    d.add_argument("--rounds", type=int, default=3, metavar="N", help="timed generations; the median is reported")
    d.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's)")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights' float dtype (default: load's)")
    d.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    d.set_defaults(func=run_decode)


def _positive(value: int, flag: str) -> None:
    from velocis.errors import VelocisError

    if value <= 0:
        raise VelocisError(f"{flag} must be a positive integer, got {value}")


def run_decode(args) -> int:
    import torch

    import velocis
    from velocis.infer.generate import check_length, generate_ids
    from velocis.kernels import decode_cpu

    for flag in ("new_tokens", "prompt_tokens", "rounds"):
        _positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.threads is not None:
        _positive(args.threads, "--threads")
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] and getattr(torch, DTYPES[args.dtype])
    model, _ = velocis.load(args.model, device=args.device, dtype=dtype)
    if args.quantize:
        from velocis.quant import quantize_model
        from velocis.quant.swap import is_quantized

        if is_quantized(model):
            from velocis.errors import VelocisError

            raise VelocisError(f"--model {args.model} is already quantized; drop --quantize")
        quantize_model(model, bits=8 if args.quantize == "int8" else 4, group_size=None if args.quantize == "int8"
                       else 32)
    cfg = model.config
    check_length(args.prompt_tokens, args.new_tokens, cfg.max_seq_len)
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(args.prompt_tokens)]
    reason = decode_cpu.why_not(model) if model.device.type == "cpu" else "not on the CPU"
    precision = cfg.quantization and f"int{cfg.quantization['bits']}" or str(model.dtype).replace("torch.", "")
    print(f"model: {args.model} ({model.num_params() / 1e6:.1f}M parameters, {precision}, {model.device.type}, "
          f"{torch.get_num_threads()} threads)")
    print(f"path: {'C++ decode kernel' if reason is None else 'model forward (' + reason + ')'}")
    for _ in generate_ids(model, [prompt], min(8, args.new_tokens)):  # warm-up: kernel build, plan, caches
        pass
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        n = sum(1 for _ in generate_ids(model, [prompt], args.new_tokens))
        times.append(time.perf_counter() - t0)
    per_round = ", ".join(f"{n / t:.1f}" for t in times)
    print(f"{args.prompt_tokens}-token prompt + {n} new tokens, {args.rounds} rounds: {per_round} tokens/s")
    print(f"tokens/s: {n / statistics.median(times):.1f}")
    return 0
