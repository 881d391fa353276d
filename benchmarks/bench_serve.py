"""Serving benchmark: `velocis serve` under N concurrent streaming clients.

    python benchmarks/bench_serve.py --small                       # a tiny model: a quick check (~1 min)
    python benchmarks/bench_serve.py                               # the 125M Llama-shaped model, 64 clients
    python benchmarks/bench_serve.py --clients 16 --requests 32    # a shorter run of the 125M model

Builds a random-weight model (default: hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048, vocabulary
32000, untied head: 124.7M parameters) and a 32000-token BPE tokenizer trained on synthetic words (so
every sampled id decodes to text and streams as its own chunk), starts `velocis serve` in a subprocess
on a free loopback port, and runs --clients concurrent streaming clients over --requests requests:
prompts of 20-300 random tokens (sent as token ids), 64 output tokens each (ignore_eos, greedy).
Checks that no request is lost or cut short (usage.completion_tokens == 64 for every one) and prints
requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL, the gaps between
a stream's chunks) percentiles. The server is stopped with SIGINT and must exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(out: Path, small: bool, seed: int = 0) -> Path:
    import torch

    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    if (out / "config.json").is_file():
        return out
    rng = random.Random(seed)
    syllables = [c + v + e for c in "bcdfghjklmnprstvwz" for v in "aeiou" for e in ("", "n", "r", "s")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    text = out.parent / "words.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(100)) for _ in range(6000)))
    tok = Tokenizer.train([str(text)], vocab_size=32000, progress=False)
    shape = (dict(hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128) if small else
             dict(hidden_dim=768, num_layers=12, num_heads=12, num_kv_heads=4, mlp_dim=2048))
    cfg = ModelConfig(vocab_size=32000, max_seq_len=1024, tie_embeddings=False, prompt_start_token_id=tok.eos_id,
                      **shape)
    torch.manual_seed(seed)
    model = VelocisModel(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, tokenizer "
          f"{tok.vocab_size} tokens -> {out}", file=sys.stderr)
    save_model(model, tok, out)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def client_run(url: str, requests: list[list[int]], clients: int, output_tokens: int) -> list[dict]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    results: list[dict] = []

    async def worker(http):
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            rec = {"i": i, "prompt_tokens": len(prompt), "chunks": [], "usage": None, "finish": None, "error": None}
            t0 = time.perf_counter()
            try:
                async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    else:
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                rec["error"] = event["error"]["message"]
                            elif event["choices"]:
                                c = event["choices"][0]
                                if c["text"]:
                                    rec["chunks"].append(time.perf_counter() - t0)
                                rec["finish"] = c["finish_reason"] or rec["finish"]
                            else:
                                rec["usage"] = event["usage"]
            except Exception as e:  # a lost request is a result too
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["e2e"] = time.perf_counter() - t0
            results.append(rec)

    # idle connections expire on the client first (uvicorn closes them after 5 s): no reuse race
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return results


def wait_healthy(url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not come up")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny model (hidden 64, 2 layers): a quick run")
    p.add_argument("--clients", type=int, default=None, help="concurrent streaming clients (default 64; 16 --small)")
    p.add_argument("--requests", type=int, default=None, help="requests in all (default 4 x clients)")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=20)
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--max-num-seqs", type=int, default=None, help="the server's batch (default: --clients)")
    p.add_argument("--kv-cache-memory", default="0.25")
    p.add_argument("--model-dir", default=None, help="build the model here (kept; reused when it exists)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    clients = args.clients or (16 if args.small else 64)
    n_requests = args.requests or 4 * clients

    from velocis.serve.server import free_port

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_") if args.model_dir is None else None
    model_dir = build_model(Path(args.model_dir or Path(tmp.name) / "model"), args.small, args.seed)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(300, 32000) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
               for _ in range(n_requests)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "velocis", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs or clients), "--kv-cache-memory", args.kv_cache_memory,
           "--device", args.device, "--log-level", "warning"]
    log_path = Path(tempfile.mkstemp(prefix="bench_serve_", suffix=".log")[1])
    log = open(log_path, "wb")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stderr=log)
    try:
        wait_healthy(url, proc)
        t0 = time.perf_counter()
        results = asyncio.run(client_run(url, prompts, clients, args.output_tokens))
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        if tmp is not None:
            tmp.cleanup()

    ok = [r for r in results if r["error"] is None and r["usage"]
          and r["usage"]["completion_tokens"] == args.output_tokens and r["finish"] == "length"]
    lost = n_requests - len(ok)
    out_tokens = sum(r["usage"]["completion_tokens"] for r in ok)
    ttft = [r["chunks"][0] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["e2e"] for r in ok]
    numbers = {
        "model": "small" if args.small else "125M", "clients": clients, "requests": n_requests, "lost": lost,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "output_tokens": out_tokens,
        "seconds": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_p50_s": pct(e2e, 50), "chunks_per_request": statistics.mean(len(r["chunks"]) for r in ok) if ok else 0,
        "server_exit": rc, "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    rows = [("requests (lost)", f"{n_requests} ({lost})"), ("concurrent clients", clients),
            ("prompt / output tokens", f"{numbers['prompt_tokens']:,} / {out_tokens:,}"),
            ("wall time", f"{wall:.1f} s"), ("requests/s", f"{numbers['requests_per_s']:.2f}"),
            ("output tokens/s", f"{numbers['output_tokens_per_s']:.1f}"),
            ("TTFT p50 / p99", f"{numbers['ttft_p50_s'] * 1e3:.0f} / {numbers['ttft_p99_s'] * 1e3:.0f} ms"),
            ("ITL p50 / p99", f"{numbers['itl_p50_s'] * 1e3:.1f} / {numbers['itl_p99_s'] * 1e3:.1f} ms"),
            ("end-to-end p50", f"{numbers['e2e_p50_s']:.2f} s"), ("server exit status", rc)]
    width = max(len(k) for k, _ in rows)
    print(f"\nvelocis serve, {numbers['model']} model, {n_requests} requests, {clients} clients, prompts "
          f"{args.min_prompt}-{args.max_prompt} tokens, {args.output_tokens} output tokens")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    log.close()
    errors = [r["error"] for r in results if r["error"]][:3]
    if errors or rc != 0:
        print("errors:", *errors, f"server log: {log_path}", sep="\n  ", file=sys.stderr)
    else:
        log_path.unlink()
    return 0 if lost == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
