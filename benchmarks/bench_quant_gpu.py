"""The Triton weight-only quantized matmul (velocis/quant/triton_matmul.py) against fp16 F.linear
(cuBLAS on the unquantized weight) and the plain-PyTorch reference (dequantize + F.linear), on the
projections of a 125M Llama (hidden 768, MLP 2048) and a 7B-like one (hidden 4096, MLP 11008), at
decode (M = 1, 16 tokens) and prefill (M = 512) sizes. Needs a CUDA device.

    python benchmarks/bench_quant_gpu.py [--dtype float16|bfloat16] [--models 125m,7b] [--m 1,16,512]
                                         [--formats int8,int8-g128,int4-g128,int4-g32-sym] [--mode graph,eager]

Each method cycles through enough copies of its weights (at least --footprint MB of fp16 weights)
that they come from HBM, not the L2 cache, as they do when a model's layers run one after another.
"graph" times the calls replayed from a CUDA graph (GPU time: what a graph-captured decode step
sees); "eager" times a plain Python loop of calls (launch overhead included). Times are per call in
microseconds, the median of --trials; ratios > 1 mean the Triton kernel is faster. `err` is
max |triton - reference| / max |reference|.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
import torch.nn.functional as F

MODELS = {  # name -> {projection: (in_features, out_features)}
    "125m": {"q/o 768->768": (768, 768), "gate/up 768->2048": (768, 2048), "down 2048->768": (2048, 768)},
    "7b": {"q/o 4096->4096": (4096, 4096), "gate/up 4096->11008": (4096, 11008),
           "down 11008->4096": (11008, 4096)},
}
FORMATS = {  # name -> (bits, group_size, symmetric)
    "int8": (8, None, True), "int8-g128": (8, 128, True),
    "int4-g128": (4, 128, False), "int4-g32": (4, 32, False), "int4-g128-sym": (4, 128, True),
    "int4-g32-sym": (4, 32, True),
}


def fail(msg: str) -> None:
    print(f"bench_quant_gpu: {msg}", file=sys.stderr)
    sys.exit(2)


def time_calls(calls, mode: str, trials: int, min_ms: float = 30.0) -> float:
    """Microseconds per call of `calls` (a list of thunks, run in order, one pass = all of them)."""
    def one_pass():
        for c in calls:
            c()

    one_pass()  # compile / warm
    torch.cuda.synchronize()
    if mode == "graph":
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            one_pass()  # warm-up on the capture stream (allocator pools)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            one_pass()
        run = g.replay
    else:
        run = one_pass
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    reps = max(1, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    out = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) * 1000.0 / (reps * len(calls)))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--models", default="125m,7b")
    ap.add_argument("--m", default="1,16,512", help="rows of x (tokens)")
    ap.add_argument("--formats", default="int8,int4-g128,int4-g32-sym", help=", ".join(FORMATS))
    ap.add_argument("--mode", default="graph,eager")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--footprint", type=float, default=512.0, help="MB of fp16 weights cycled per method")
    ap.add_argument("--no-reference", action="store_true", help="skip timing dequantize + F.linear")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        fail("no CUDA device (torch.cuda.is_available() is False): this benchmark times GPU kernels only; "
             "run it on a machine with an NVIDIA GPU and a CUDA build of torch")
    from velocis.quant import triton_matmul as tm
    from velocis.quant.formats import QSpec, quantize_rtn

    if not tm.available():
        fail("triton is not installed (pip install triton; CUDA builds of torch bring it)")
    dtype = getattr(torch, args.dtype)
    models = [s for s in args.models.split(",") if s]
    formats = [s for s in args.formats.split(",") if s]
    modes = [s for s in args.mode.split(",") if s]
    ms = [int(s) for s in args.m.split(",") if s]
    for name, known in (("model", MODELS), ("format", FORMATS)):
        for s in models if name == "model" else formats:
            if s not in known:
                fail(f"unknown {name} {s!r}; known: {', '.join(known)}")
    if set(modes) - {"graph", "eager"}:
        fail(f"--mode takes graph and/or eager, got {args.mode!r}")

    import triton
    dev = torch.device("cuda")
    print(f"# {datetime.date.today()}  {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  "
          f"triton {triton.__version__}  x {args.dtype}  (microseconds per call; ratio > 1: Triton faster)")
    torch.manual_seed(0)
    rows = []
    for model in models:
        for proj, (k, n) in MODELS[model].items():
            copies = int(min(256, max(2, args.footprint * 2**20 // (2 * k * n))))
            ws = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
            quant = {}
            for f in formats:
                bits, group, sym = FORMATS[f]
                spec = QSpec(bits, group, sym)
                quant[f] = (spec, [quantize_rtn(w, spec) for w in ws])
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                base = {mode: time_calls([lambda w=w: F.linear(x, w) for w in ws], mode, args.trials)
                        for mode in modes}
                for f in formats:
                    spec, qts = quant[f]
                    tri = [lambda q=q: tm.quant_matmul(x, q.qweight, q.scales, q.zeros, spec, k) for q in qts]
                    ref = [lambda q=q: F.linear(x, q.dequantize(dtype)) for q in qts]
                    y, r = tri[0](), ref[0]()
                    err = ((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
                    t_tri = {mode: time_calls(tri, mode, args.trials) for mode in modes}
                    t_ref = ({mode: float("nan") for mode in modes} if args.no_reference
                             else {mode: time_calls(ref, mode, args.trials) for mode in modes})
                    rows.append((model, proj, m, f, base, t_ref, t_tri, err))
                    cells = "  ".join(f"{mode}: fp16 {base[mode]:8.1f} ref {t_ref[mode]:8.1f} triton {t_tri[mode]:8.1f}"
                                      for mode in modes)
                    print(f"  {model:5s} {proj:20s} M={m:<4d} {f:14s} {cells}  err {err:.1e}", flush=True)
            del ws, quant
            torch.cuda.empty_cache()

    print()
    head = f"{'model':5s} {'projection':20s} {'M':>4s} {'format':14s}"
    for mode in modes:
        head += f" | {mode + ' us':>9s} {'fp16/tri':>8s} {'ref/tri':>8s}"
    print(head + " | err")
    print("-" * len(head) + "-------")
    for model, proj, m, f, base, t_ref, t_tri, err in rows:
        line = f"{model:5s} {proj:20s} {m:4d} {f:14s}"
        for mode in modes:
            line += f" | {t_tri[mode]:9.1f} {base[mode] / t_tri[mode]:8.2f} {t_ref[mode] / t_tri[mode]:8.2f}"
        print(line + f" | {err:.1e}")
    print()
    print("geometric mean of fp16 F.linear time / Triton time over the projections:")
    for mode in modes:
        for model in models:
            for m in ms:
                parts = []
                for f in formats:
                    rs = [b[mode] / t[mode] for (mo, _, mm, ff, b, _, t, _) in rows if (mo, mm, ff) == (model, m, f)]
                    gm = torch.tensor(rs).log().mean().exp().item() if rs else float("nan")
                    parts.append(f"{f} {gm:.2f}x")
                print(f"  {mode:5s} {model:5s} M={m:<4d} " + "  ".join(parts))


if __name__ == "__main__":
    main()
