"""Does `velocis data prepare` stream? Throughput (MB/s of input text) and peak memory (RSS of
the whole process tree: the CLI and its tokenizer workers) on ../shared/data and on inputs
N times larger (the same files repeated into a temp dir). Flat peak memory = streaming.

    python benchmarks/bench_data_prepare.py [--data ../shared/data] [--scales 1,3,10] [--num-workers 2]

A tokenizer (8192 tokens) is trained once on a sample of the data; each preparation runs as a
fresh `velocis data prepare` subprocess, sampled every 20 ms with psutil.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(zh: Path, en: Path, tok: Path, out: Path, workers: int, shard_mb: float) -> dict:
    cmd = [sys.executable, "-m", "velocis", "data", "prepare", "--chinese-path", str(zh), "--english-path", str(en),
           "--tokenizer", str(tok), "--output", str(out), "--num-workers", str(workers), "--shard-mb", str(shard_mb),
           "--quiet"]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {proc.stderr.read().decode()}")
    index = json.loads((out / "index.json").read_text())
    tokens = sum(s["tokens"] for s in index["splits"].values())
    return {"seconds": seconds, "peak_rss": peak, "tokens": tokens}


def repeated(data: Path, copies: int, root: Path) -> Path:
    """Each file of data/zh and data/en written `copies` times over, into root."""
    for lang in ("zh", "en"):
        (root / lang).mkdir(parents=True)
        for f in sorted((data / lang).iterdir()):
            text = f.read_bytes().rstrip(b"\n") + b"\n\n"
            with open(root / lang / f.name, "wb") as out:
                for _ in range(copies):
                    out.write(text)
    return root


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="holds zh/ and en/")
    ap.add_argument("--scales", default="1,3,10", help="input sizes, in copies of the data (default 1,3,10)")
    ap.add_argument("--num-workers", type=int, default=os.cpu_count())
    ap.add_argument("--shard-mb", type=float, default=8.0)
    ap.add_argument("--tmp", help="work dir (default: a temp dir, removed after)")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "zh").is_dir() or not (data / "en").is_dir():
        raise SystemExit(f"{data}: expected zh/ and en/ subdirectories")
    from velocis.tokenizer import Tokenizer

    work = Path(args.tmp or tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        tok_dir = work / "tok"
        t0 = time.perf_counter()
        Tokenizer.train([data / "zh", data / "en"], vocab_size=8192, progress=False,
                        max_bytes_per_file=2_000_000).save(tok_dir)
        print(f"tokenizer: 8192 tokens trained on a 2 MB/file sample in {time.perf_counter() - t0:.1f}s")

        rows = []
        for scale in map(int, args.scales.split(",")):
            root = data if scale == 1 else repeated(data, scale, work / f"x{scale}")
            r = run_prepare(root / "zh", root / "en", tok_dir, work / "out", args.num_workers, args.shard_mb)
            r.update(name=f"{scale}x", mb=(dir_bytes(root / "zh") + dir_bytes(root / "en")) / 1e6)
            rows.append(r)
            shutil.rmtree(work / "out")
            if root != data:
                shutil.rmtree(root)

        cpu = platform.processor() or platform.machine()
        print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores ({cpu}); "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; --num-workers {args.num_workers} "
              f"--shard-mb {args.shard_mb:g}; Python {platform.python_version()}")
        print(f"\n| input | text MB | tokens | seconds | MB/s | peak RSS (tree) MB | peak / 1x |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['mb']:.1f} | {r['tokens']:,} | {r['seconds']:.1f} | {r['mb'] / r['seconds']:.2f} "
                  f"| {r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / rows[0]['peak_rss']:.2f} |")
    finally:
        if not args.tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
