"""Is memory bounded on huge documents? Peak RSS and throughput of `velocis tokenizer train` and
`velocis data prepare` on a generated input of --size-mb (default 1024 MB): ordinary documents
plus three 50 MB documents that are one document each (Chinese with no newline at all, English on
one line, Chinese lines with no blank line between them).

    python benchmarks/bench_prepare_memory.py [--size-mb 1024] [--sample-mb 16] [--num-workers 2]

Each command runs as a fresh subprocess, sampled every 20 ms with psutil; peak = RSS of the whole
process tree (the CLI and its tokenizer workers). The input is written to a temp dir and removed.
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

HUGE_MB = 50


def peak_rss(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes of the process tree) of one command; exits on failure."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")
    return seconds, peak


def write_repeated(path: Path, text: str, nbytes: int, sep: str) -> None:
    """`text`'s documents (blank-line separated) joined by `sep`, repeated up to nbytes, numbered so
    that no two copies are the same text."""
    docs = text.strip("\n").split("\n\n")
    with open(path, "w", encoding="utf-8") as f:
        written, copy = 0, 0
        while written < nbytes:
            chunk = sep.join(f"[{copy}] {d}" for d in docs) + sep
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            copy += 1


def make_input(root: Path, size_mb: int) -> dict[str, list[Path]]:
    from velocis.data.default_corpus import write_default_corpus

    zh, en = write_default_corpus(root / "base", documents=6000)
    zh_text, en_text = zh.read_text(encoding="utf-8"), en.read_text(encoding="utf-8")
    (root / "zh").mkdir()
    (root / "en").mkdir()
    huge = min(HUGE_MB, max(1, size_mb // 20)) * 2**20
    normal = (size_mb * 2**20 - 3 * huge) // 6  # three ordinary files per language
    for i in range(3):
        write_repeated(root / "zh" / f"docs{i}.txt", zh_text, normal, "\n\n")
        write_repeated(root / "en" / f"docs{i}.txt", en_text, normal, "\n\n")
    write_repeated(root / "zh" / "huge_no_newline.txt", zh_text.replace("\n", ""), huge, "")
    write_repeated(root / "zh" / "huge_lines.txt", zh_text.replace("\n\n", "\n"), huge, "\n")
    write_repeated(root / "en" / "huge_one_line.txt", en_text.replace("\n", " "), huge, " ")
    return {lang: sorted((root / lang).iterdir()) for lang in ("zh", "en")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="input size in MB (default 1024)")
    ap.add_argument("--sample-mb", type=float, default=16, help="tokenizer train --sample-mb (default 16)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--num-workers", type=int, default=os.cpu_count())
    ap.add_argument("--tmp", help="work dir (default: a temp dir, removed after)")
    args = ap.parse_args()

    work = Path(args.tmp or tempfile.mkdtemp(prefix="bench_memory_"))
    cli = [sys.executable, "-m", "velocis"]
    try:
        t0 = time.perf_counter()
        files = make_input(work / "input", args.size_mb)
        all_files = files["zh"] + files["en"]
        total_mb = sum(f.stat().st_size for f in all_files) / 2**20
        print(f"input: {total_mb:.0f} MB in {len(all_files)} files, written in {time.perf_counter() - t0:.0f}s")

        rows = []
        sampled = sum(min(f.stat().st_size, args.sample_mb * 2**20) for f in all_files) / 2**20
        cmd = ["tokenizer", "train", "--input", str(work / "input" / "zh"), str(work / "input" / "en"),
               "--vocab-size", str(args.vocab_size), "--sample-mb", f"{args.sample_mb:g}", "--output",
               str(work / "tok"), "--quiet"]
        rows.append(("velocis " + " ".join(cmd[:2]) + f" --sample-mb {args.sample_mb:g}", sampled, *peak_rss(cli + cmd)))
        huge = [f for f in all_files if f.name.startswith("huge")]
        cmd = ["tokenizer", "train", "--input", *map(str, huge), "--vocab-size", str(args.vocab_size),
               "--output", str(work / "tok_huge"), "--quiet"]
        rows.append(("velocis tokenizer train (the 3 huge documents only, no sample)",
                     sum(f.stat().st_size for f in huge) / 2**20, *peak_rss(cli + cmd)))
        cmd = ["data", "prepare", "--chinese-path", str(work / "input" / "zh"), "--english-path",
               str(work / "input" / "en"), "--tokenizer", str(work / "tok"), "--output", str(work / "data"),
               "--num-workers", str(args.num_workers), "--quiet"]
        rows.append((f"velocis data prepare --num-workers {args.num_workers}", total_mb, *peak_rss(cli + cmd)))
        index = json.loads((work / "data" / "index.json").read_text())
        tokens = sum(s["tokens"] for s in index["splits"].values())

        cpu = platform.processor() or platform.machine()
        print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores ({cpu}); "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; Python {platform.python_version()}; "
              f"vocabulary {args.vocab_size}; {tokens:,} tokens prepared")
        print("\n| command | text MB | seconds | MB/s | peak RSS (tree) MB |")
        print("|---|---:|---:|---:|---:|")
        for name, mb, seconds, peak in rows:
            print(f"| {name} | {mb:.0f} | {seconds:.0f} | {mb / seconds:.2f} | {peak / 2**20:.0f} |")
    finally:
        if not args.tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
