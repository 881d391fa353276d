"""`velocis plot RUN_DIR`: loss / bits-per-byte / learning-rate curves as a PNG."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot a training run's curves to PNG", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", "-o", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from velocis.train.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0
