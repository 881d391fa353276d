"""`velocis plan`: a training layout on paper (train/plan.py): per-GPU memory, step time, MFU and the
best layout Velocis can run, from the model's shape and stated hardware figures. Nothing is allocated.

    velocis plan --preset deepseek-v3.2 --gpus 128 --gpu-memory 80GB
    velocis plan --preset deepseek-v3.2 --gpus 128 --gpu-memory 80GB --fsdp 128 --ep 8 --activation-checkpointing
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from velocis.errors import VelocisError

GB = 1e9


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan a multi-GPU training run: memory per GPU, step time, MFU, best layout",
                       description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named preset (velocis params --list)")
    src.add_argument("--model", metavar="DIR", help="a Velocis model directory (reads config.json)")
    g = p.add_argument_group("hardware")
    g.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    g.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory per GPU, e.g. 80GB or 141GiB")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100/H800: 989)")
    g.add_argument("--efficiency", type=float, default=0.5, help="share of the peak the matmuls reach (0.5)")
    g.add_argument("--intra-node-gbps", type=float, default=400.0, help="GB/s per GPU inside a node (NVLink)")
    g.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s IB)")
    g.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth, TB/s")
    g.add_argument("--reserve", type=float, default=0.1, help="share of GPU memory left unplanned (0.1)")
    g = p.add_argument_group("workload")
    g.add_argument("--seq-len", type=int, default=4096)
    g.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    g.add_argument("--grad-bytes", type=int, choices=[2, 4], default=4, help="bytes per gradient (Velocis: 4)")
    g.add_argument("--optimizer-bytes", type=int, choices=[4, 8], default=8,
                   help="bytes of AdamW state per parameter (8: fp32 moments; 4: bf16, DeepSeek-V3's recipe)")
    g = p.add_argument_group("a layout to evaluate (otherwise only the best ones are listed)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], help="ddp: every GPU holds the dense parameters")
    g.add_argument("--fsdp", type=int, metavar="N", help="shard over N GPUs (Velocis shards over all: N = --gpus)")
    g.add_argument("--ep", type=int, metavar="N", help="expert parallel degree (divides --gpus and the experts)")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--micro-batch", type=int, metavar="N", help="sequences per GPU per micro-batch")
    p.add_argument("--top", type=int, default=5, help="best layouts to list (5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def model_config(args):
    from velocis.config import ModelConfig, get_preset

    if args.preset:
        return args.preset, get_preset(args.preset)
    f = Path(args.model) / "config.json"
    if not f.is_file():
        raise VelocisError(f"--model {args.model}: no config.json there (a Velocis model directory)")
    return args.model, ModelConfig.load(f)


def chosen_layout(args):
    """The layout the flags describe, or None when none of them was given."""
    from velocis.train.plan import Layout

    if args.fsdp is not None and args.fsdp != args.gpus:
        raise VelocisError(f"--fsdp {args.fsdp}: Velocis' FSDP shards over every process (hybrid sharding is not "
                           f"implemented); give --fsdp {args.gpus} (= --gpus) or --parallel ddp")
    if args.fsdp is not None and args.parallel == "ddp":
        raise VelocisError("--fsdp and --parallel ddp contradict each other; give one")
    given = (args.parallel, args.fsdp, args.ep, args.micro_batch)
    if all(v is None for v in given) and not args.activation_checkpointing:
        return None
    parallel = "fsdp" if args.fsdp is not None or (args.ep or 1) > 1 else (args.parallel or "fsdp")
    if args.parallel == "ddp" and (args.ep or 1) > 1:
        parallel = "ddp"  # plan.check_layout names the conflict
    return Layout(parallel, args.ep or 1, args.activation_checkpointing, args.micro_batch or 1)


def run(args) -> int:
    from velocis.models.count import human
    from velocis.train import plan as P

    if args.gpus < 1:
        raise VelocisError(f"--gpus must be at least 1, got {args.gpus}")
    if not 0 < args.efficiency <= 1 or not 0 <= args.reserve < 1:
        raise VelocisError("--efficiency must be in (0, 1] and --reserve in [0, 1)")
    if args.seq_len < 1 or args.global_batch < 1:
        raise VelocisError("--seq-len and --global-batch must be positive")
    name, config = model_config(args)
    hw = P.Hardware(args.gpus, P.parse_bytes(args.gpu_memory), args.gpus_per_node, args.peak_tflops,
                    args.efficiency, args.intra_node_gbps, args.inter_node_gbps, args.hbm_tbps, args.reserve)
    work = P.Workload(args.seq_len, args.global_batch, args.grad_bytes, args.optimizer_bytes)
    shape = P.model_shape(config, args.seq_len)
    layout = chosen_layout(args)
    chosen = P.evaluate(shape, layout, hw, work) if layout is not None else None
    ranked = P.best(shape, hw, work)
    fewest = P.smallest_fit(shape, hw, work) if not ranked else None
    if args.json:
        print(json.dumps({"model": name, "params": shape.dense + shape.experts, "active_matmul": shape.active_matmul,
                          "hardware": hw.__dict__, "workload": work.__dict__,
                          "chosen": chosen.to_dict() if chosen else None,
                          "best": [p.to_dict() for p in ranked[:args.top]],
                          "smallest_fit": ({"gpus": fewest[0], "plan": fewest[1].to_dict()} if fewest else None)},
                         indent=2))
        return 0
    total = shape.dense + shape.experts
    print(f"{name}: {human(total)} parameters ({human(shape.experts)} in routed experts), "
          f"{human(shape.active_matmul)} multiplied per token, {shape.layers} blocks")
    print(f"{hw.gpus} GPUs x {hw.gpu_memory / GB:.0f} GB ({hw.gpus_per_node} per node), {hw.peak_tflops:g} TFLOP/s "
          f"bf16 at {hw.efficiency:.0%}; batch {work.global_batch} x {work.seq_len} tokens per step")
    if chosen is not None:
        print()
        print_plan(chosen, hw)
    print()
    if ranked:
        print(f"best layouts (of {len(P.layouts(shape, hw, work))}; fastest that fit first):")
        for i, p in enumerate(ranked[:args.top], 1):
            print(f"  {i}. {describe(p)}: {p.memory_total / GB:.1f} GB/GPU, step {p.step_s:.2f} s, MFU {p.mfu:.1%}")
        print()
        print_plan(ranked[0], hw, title="the best layout")
    else:
        print(f"no layout fits in {hw.gpu_memory * (1 - hw.reserve) / GB:.0f} GB per GPU on {hw.gpus} GPUs")
        if fewest:
            gpus, p = fewest
            print(f"the fewest GPUs that fit: {gpus} ({describe(p)})")
            print_plan(p, replace(hw, gpus=gpus))
    return 0


def describe(p) -> str:
    parts = [p.layout.parallel]
    if p.layout.expert_parallel > 1:
        parts.append(f"ep {p.layout.expert_parallel}")
    if p.layout.activation_checkpointing:
        parts.append("act. ckpt")
    return " + ".join(parts) + f", micro-batch {p.layout.micro_batch} x {p.grad_accum} accum"


def print_plan(p, hw, title: str = "layout") -> None:
    usable = hw.gpu_memory * (1 - hw.reserve)
    print(f"{title}: {describe(p)}")
    print("  memory per GPU:")
    for k, v in p.memory.items():
        print(f"    {k.replace('_', ' '):<14}{v / GB:>10.1f} GB")
    verdict = "fits" if p.fits else "does NOT fit"
    print(f"    {'total':<14}{p.memory_total / GB:>10.1f} GB of {usable / GB:.0f} GB usable: {verdict}")
    print("  time per step:")
    for k, v in p.time.items():
        print(f"    {k.replace('_', ' '):<16}{v:>9.2f} s")
    print(f"    {'step':<16}{p.step_s:>9.2f} s  (max(compute, data parallel) + expert parallel + optimizer)")
    print(f"  MFU {p.mfu:.1%}, {p.tokens_per_s:,.0f} tokens/s")
