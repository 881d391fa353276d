"""`velocis generate --model DIR --prompt TEXT`: stream a continuation to the terminal."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model, streaming tokens as they come")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model / run dir or Hugging Face dir")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    p.add_argument("--no-prompt-start", action="store_true",
                   help="do not put the model's prompt-start token (the one its documents follow in training, "
                        "EOS for Velocis models, BOS for Llama imports) before the prompt")
    p.add_argument("--quiet", action="store_true", help="no speed summary on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    import velocis
    from velocis.infer.generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)  # before the slow load
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    model, tok = velocis.load(args.model, device=args.device)
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # a non-UTF-8 terminal shows '?' rather than crashing on Chinese
        out.reconfigure(errors="replace")
    stats: dict = {}
    # every check (prompt length, token ids) runs here, before anything is printed
    pieces = velocis.generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              prompt_start=not args.no_prompt_start, stream=True, stats=stats)
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if not args.quiet:
        print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:.1f} tokens/s, "
              f"{model.device.type}, KV cache {model.cache_bytes(model.dtype.itemsize)[0]:,} "
              f"bytes/token]", file=sys.stderr)
    return 0
