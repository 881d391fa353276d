"""`velocis serve --model DIR`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model / run dir or Hugging Face dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the dir name)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch at most")
    p.add_argument("--kv-cache-memory", default="0.25", metavar="BYTES_OR_FRACTION",
                   help="KV-cache budget: a fraction of free memory (0.25) or bytes (2000000000, 2GB, 512MiB)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precision to compute in (default auto: fp32 on a CPU, bf16 on a GPU that has it)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on Ctrl-C / SIGTERM, seconds to let running requests finish before aborting them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args) -> int:
    from velocis.errors import VelocisError
    from velocis.serve.model import ServedModel
    from velocis.serve.server import build_app, check_bind, parse_memory, run_foreground

    memory = parse_memory(args.kv_cache_memory)  # every check before the slow load
    if not 0 < args.port < 65536:
        raise VelocisError(f"--port {args.port} must be in 1..65535")
    if args.api_key is not None and not args.api_key.strip():
        raise VelocisError("--api-key is empty")
    check_bind(args.host, args.port)
    served = ServedModel.load(args.model, device=args.device, name=args.served_model_name, dtype=args.dtype)
    app = build_app(served, api_key=args.api_key, max_num_seqs=args.max_num_seqs, kv_cache_memory=memory)
    engine = app.state.engine_loop.engine
    print(f"velocis serve: {served.name} on http://{args.host}:{args.port}/v1 ({served.model.device.type}, "
          f"context {served.context}, {engine.allocator.num_blocks - 1} KV blocks of {engine.block_size} tokens, "
          f"batch {args.max_num_seqs}, chat template: "
          f"{'none' if served.chat is None else 'built-in' if served.chat.builtin else 'the model' + chr(39) + 's'})",
          file=sys.stderr, flush=True)
    return run_foreground(app, args.host, args.port, args.shutdown_timeout, args.log_level)
