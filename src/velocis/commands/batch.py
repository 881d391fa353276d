"""`velocis batch --model DIR --input requests.jsonl --output results.jsonl`: run an OpenAI batch file
through one engine (all requests concurrently), resumable: a rerun skips what the output already has."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("batch", help="run an OpenAI batch file (JSONL of requests) through one engine")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model / run dir or Hugging Face dir")
    p.add_argument("--input", required=True, metavar="FILE", help="requests, one JSON object a line")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="results, appended one a line (a rerun skips the custom_ids already there)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch at most")
    p.add_argument("--kv-cache-memory", default="0.25", metavar="BYTES_OR_FRACTION",
                   help="KV-cache budget: a fraction of free memory (0.25) or bytes (2000000000, 2GB, 512MiB)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precision to compute in (default auto: fp32 on a CPU, bf16 on a GPU that has it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    import asyncio
    from pathlib import Path

    from velocis.errors import VelocisError
    from velocis.serve.batch import run_batch
    from velocis.serve.engine_loop import EngineLoop
    from velocis.serve.model import ServedModel
    from velocis.serve.openai_api import OpenAIApi
    from velocis.serve.server import build_engine, parse_memory

    memory = parse_memory(args.kv_cache_memory)
    if not Path(args.input).is_file():
        raise VelocisError(f"--input {args.input}: no such file")
    served = ServedModel.load(args.model, device=args.device, dtype=args.dtype)
    engine_loop = EngineLoop(build_engine(served, args.max_num_seqs, memory)).start()
    show = sys.stderr.isatty() and not args.no_progress

    async def main():
        api = OpenAIApi(served, engine_loop)
        if not show:
            return await run_batch(api, args.input, args.output)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            total = sum(1 for line in open(args.input, encoding="utf-8", errors="replace") if line.strip())
            task = bar.add_task("batch", total=total)
            counts = await run_batch(api, args.input, args.output, progress=lambda k: bar.advance(task, k))
            return counts

    try:
        counts = asyncio.run(main())
    finally:
        engine_loop.stop()
    print(f"velocis batch: {counts['succeeded']} succeeded, {counts['failed']} failed, {counts['skipped']} already "
          f"done (of {counts['total']}) -> {args.output}", file=sys.stderr)
    return 0
