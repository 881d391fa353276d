"""Velocis' CPU GEMM (kernels/csrc/gemm_cpu.cpp) against PyTorch's (MKL on x86) on the products of
one `micro` training step, in one process, alternating the two on the same operands.

    python benchmarks/bench_gemm_cpu.py [--threads 2] [--rounds 15] [--tokens 4096]

Prints GFLOP/s (best of `rounds` alternating pairs) and Velocis / torch per product.
"""
from __future__ import annotations

import argparse
import time

import torch

from velocis.kernels import cpu_ops


def products(tokens: int, hidden: int = 256, mlp: int = 704, vocab: int = 8192, chunk: int = 1024):
    """name -> (M, N, K, A transposed, B transposed): the layouts the step hands the GEMM."""
    return {
        "q/o forward      x W^T": (tokens, hidden, hidden, False, True),
        "gate/up forward  x W^T": (tokens, mlp, hidden, False, True),
        "down forward     h W^T": (tokens, hidden, mlp, False, True),
        "gate/up dX       dY W": (tokens, hidden, mlp, False, False),
        "gate/up dW       dY^T X": (mlp, hidden, tokens, True, False),
        "down dW          dY^T h": (hidden, mlp, tokens, True, False),
        "LM head logits   W h^T": (vocab, chunk, hidden, False, True),
        "LM head dh       g^T W": (chunk, hidden, vocab, True, False),
        "LM head dW       g h": (vocab, hidden, chunk, False, False),
    }


def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
    return torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = cpu_ops.ops()
    if ops is None or not ops.gemm_supported():
        raise SystemExit("the Velocis GEMM is not built on this machine (needs a C++ compiler and AVX2 + FMA)")
    print(f"# bench_gemm_cpu  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{args.threads} threads, best of {args.rounds} alternating rounds\n")
    print("| product                  |     M x N x K      | torch GFLOP/s | velocis GFLOP/s | velocis / torch |")
    print("|--------------------------|--------------------|---------------|-----------------|-----------------|")
    for name, (m, n, k, ta, tb) in products(args.tokens).items():
        a, b, c = operand(m, k, ta), operand(k, n, tb), torch.empty(m, n)
        runs = {"torch": lambda: torch.mm(a, b, out=c), "velocis": lambda: ops.gemm_(c, a, b, 0.0, 1.0)}
        best = dict.fromkeys(runs, float("inf"))
        for f in runs.values():
            f()
        for _ in range(args.rounds):
            for key, f in runs.items():
                t = time.perf_counter()
                f()
                best[key] = min(best[key], time.perf_counter() - t)
        rate = {key: 2 * m * n * k / s / 1e9 for key, s in best.items()}
        print(f"| {name:24s} | {f'{m}x{n}x{k}':18s} | {rate['torch']:13.1f} | {rate['velocis']:15.1f} "
              f"| {rate['velocis'] / rate['torch']:14.2f}x |")


if __name__ == "__main__":
    main()
