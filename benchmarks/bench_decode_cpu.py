"""Batch-1 greedy decoding on a CPU: Velocis against transformers and llama.cpp, side by side.

One 125M Llama-shaped model (hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048, vocab 32000,
random weights saved by transformers) is decoded by each contestant in turn, round after round
(the machine's drift hits all alike); after one untimed warm-up round, each round is a run of
--new-tokens greedy tokens after a 16-token prompt, prefill included. Velocis runs at fp32, bf16 and
fp16 and as `velocis quantize` int8 (per channel) and int4 (g32) models. Reported: median tokens/s and the ratio to llama.cpp at the same
precision. llama.cpp (llama-cpp-python) runs Velocis' own GGUF export (`velocis export --format
gguf --type ...`); it is skipped, with a note, when llama_cpp is not installed (a benchmark-only
dependency: `pip install llama-cpp-python`, ~5 minutes to build here).

    python benchmarks/bench_decode_cpu.py [--new-tokens 64] [--rounds 3] [--threads 2] [--types f32,f16,q8_0,q4_0]
        [--velocis fp32,bf16,fp16,int8,int4]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=False)


def build(root: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(root / "hf")
    subprocess.run([sys.executable, "-m", "velocis", "convert", "--from-hf", str(root / "hf"), "--output",
                    str(root / "velocis")], check=True, capture_output=True)
    return root


def velocis_runner(root: Path, dtype: torch.dtype, bits: int | None = None):
    """Velocis' own path for its users: `velocis quantize` (int8 per channel; int4 g32 with zero
    points, round-to-nearest) writes the quantized model, `velocis.load` reads it."""
    import velocis
    from velocis.infer.generate import generate_ids

    src = root / "velocis"
    if bits is not None:
        src = root / f"velocis-int{bits}"
        if not src.exists():
            group = [] if bits == 8 else ["--group-size", "32"]
            subprocess.run([sys.executable, "-m", "velocis", "quantize", "--model", str(root / "velocis"), "--bits",
                            str(bits), *group, "--output", str(src)], check=True, capture_output=True)
    model, _ = velocis.load(src, device="cpu", dtype=dtype)

    def run(prompt: list[int], n: int) -> list[int]:
        return [int(t) for t in generate_ids(model, [prompt], n)]
    return run


def transformers_runner(root: Path, dtype: torch.dtype):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(root / "hf", torch_dtype=dtype).eval()

    def run(prompt: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()
    return run


def llama_cpp_runner(root: Path, kind: str, threads: int):
    import llama_cpp

    gguf = root / f"model-{kind}.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, "-m", "velocis", "export", "--format", "gguf", "--type", kind, "--model",
                        str(root / "velocis"), "--output", str(gguf)], check=True, capture_output=True)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=64, verbose=False)

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0", help="llama.cpp GGUF types to run")
    ap.add_argument("--velocis", default="fp32,bf16,fp16,int8,int4", help="Velocis precisions to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompt = list(range(100, 116))
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp))
        contestants = {"transformers fp32": transformers_runner(root, torch.float32)}
        for prec in args.velocis.split(","):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
            bits = {"int8": 8, "int4": 4}.get(prec)
            contestants[f"velocis {prec}"] = velocis_runner(root, dtype, bits)
        has_llama = importlib.util.find_spec("llama_cpp") is not None
        if has_llama:
            for kind in args.types.split(","):
                contestants[f"llama.cpp {kind}"] = llama_cpp_runner(root, kind, args.threads)
        times = {name: [] for name in contestants}
        tokens = {}
        for run in contestants.values():  # warm-up: kernel builds, first-call allocations
            run(prompt, 8)
        for _ in range(args.rounds):
            for name, run in contestants.items():
                t0 = time.perf_counter()
                tokens[name] = run(prompt, args.new_tokens)
                times[name].append(time.perf_counter() - t0)
    rate = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"125M Llama shape, batch 1, {args.new_tokens} greedy tokens after 16, median of {args.rounds} rounds")
    if not has_llama:
        print("llama.cpp: not installed (pip install llama-cpp-python); its rows are missing")
    ref = tokens.get("velocis fp32")  # None when --velocis leaves fp32 out: the column says "-"
    print("| contestant | tokens/s | vs llama.cpp at its precision | same greedy tokens as velocis fp32 |")
    print("|---|---:|---:|---|")
    peer = {"fp32": "llama.cpp f32", "bf16": "llama.cpp f16", "fp16": "llama.cpp f16", "int8": "llama.cpp q8_0",
            "int4": "llama.cpp q4_0"}
    for name, r in rate.items():
        prec = name.split()[-1]
        match = peer.get(prec)
        ratio = f"{r / rate[match]:.2f}x" if match in rate and not name.startswith("llama") else ""
        print(f"| {name} | {r:.1f} | {ratio} | {'-' if ref is None else tokens[name] == ref} |")


if __name__ == "__main__":
    main()
