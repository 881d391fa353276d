"""What a run shows while it trains, and what it leaves behind.

* `MetricsLog` appends one JSON object per line to RUN/metrics.jsonl (train steps, evals).
* `LiveMonitor` draws a rich dashboard on a terminal: loss chart, tokens/s, learning rate,
  ETA, memory, validation bits-per-byte, plus any extra stats the model reports (e.g. MoE
  expert load), shown generically: numbers as numbers, lists as sparklines.
* `PlainMonitor` prints one log line every few steps when stdout is not a terminal.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

BLOCKS = " ▁▂▃▄▅▆▇█"


# --- formatting helpers --------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(seconds, 0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        flat = [x for x in v if isinstance(x, (int, float))]
        if flat and len(flat) == len(v):
            return sparkline(flat, zero_based=True)
        return " | ".join(fmt_value(x) for x in v[:4]) + (" …" if len(v) > 4 else "")
    return str(v)


def sparkline(values: list[float], zero_based: bool = False) -> str:
    # zero_based: bars from 0 (loads, counts) so that 7,7,8,9 reads as balanced
    lo, hi = (min(0, min(values)) if zero_based else min(values)), max(values)
    span = hi - lo
    return "".join(BLOCKS[1 + int(7 * (v - lo) / span) if span > 0 else 4] for v in values)


def _bucket(values: list[float], width: int) -> list[float]:
    """Average `values` into at most `width` buckets."""
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        a, b = i * len(values) // width, (i + 1) * len(values) // width
        chunk = values[a:max(b, a + 1)]
        out.append(sum(chunk) / len(chunk))
    return out


def chart(values: list[float], width: int = 60, height: int = 6) -> list[str]:
    """A block-character chart, newest on the right, with the y range on the left."""
    vals = [v for v in _bucket(values, width) if math.isfinite(v)]
    if not vals:
        return []
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    levels = [(v - lo) / span * (height * 8 - 1) + 1 for v in vals]
    rows = []
    for r in range(height):
        base = (height - 1 - r) * 8
        line = "".join(BLOCKS[int(min(max(lv - base, 0), 8))] for lv in levels)
        label = f"{hi:7.3f} " if r == 0 else (f"{lo:7.3f} " if r == height - 1 else " " * 8)
        rows.append(label + "│" + line)
    return rows


def memory_usage() -> str:
    import psutil
    import torch

    parts = [f"RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(f"CUDA max {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return " · ".join(parts)


# --- metrics file --------------------------------------------------------------------------
class MetricsLog:
    """RUN/metrics.jsonl, one record per line; `truncate_after(step)` on resume drops the lines
    a killed run wrote after its last checkpoint, so the file reads as one continuous run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = None

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
            if rec.get("step", 0) <= step:
                keep.append(line)
        from velocis.utils.atomic import atomic_write_text

        atomic_write_text(self.path, "".join(l + "\n" for l in keep))

    def reset(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# --- monitors ------------------------------------------------------------------------------
class Monitor:
    """Interface: the loop calls start(), train(record), eval(record), note(text), stop()."""

    def __init__(self, title: str, max_steps: int | None, log_every: int = 10):
        self.title, self.max_steps, self.log_every = title, max_steps, log_every

    def start(self) -> None: ...
    def train(self, rec: dict[str, Any]) -> None: ...
    def eval(self, rec: dict[str, Any]) -> None: ...
    def note(self, text: str) -> None: ...
    def stop(self) -> None: ...


class PlainMonitor(Monitor):
    def __init__(self, *a, stream=None, **kw):
        super().__init__(*a, **kw)
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self) -> None:
        self._print(self.title)

    def train(self, rec):
        if rec["step"] % self.log_every and rec["step"] != 1 and not rec.get("last"):
            return
        total = f"/{self.max_steps}" if self.max_steps else ""
        extras = "".join(
            f" | {k} {fmt_value(v)}" for k, v in rec.get("stats", {}).items() if isinstance(v, (int, float))
        )
        self._print(
            f"step {rec['step']}{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{fmt_count(rec['tokens_per_s'])} tok/s | grad {rec['grad_norm']:.3f} | "
            f"{rec['memory']} | eta {fmt_duration(rec.get('eta_s'))}{extras}"
        )

    def eval(self, rec):
        bpb = f" | val bpb {rec['val_bpb']:.4f}" if rec.get("val_bpb") is not None else ""
        self._print(f"eval step {rec['step']} | val loss {rec['val_loss']:.4f}{bpb}")

    def note(self, text):
        self._print(text)


class LiveMonitor(Monitor):
    """A rich Live dashboard, redrawn a few times a second."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from rich.console import Console

        self.console = Console()
        self.losses: list[float] = []
        self.val: list[tuple[int, float]] = []
        self.notes: deque[str] = deque(maxlen=4)
        self.last: dict[str, Any] | None = None
        self.first_loss: float | None = None
        self._live = None
        self._last_draw = 0.0

    def start(self):
        from rich.live import Live

        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def stop(self):
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.stop()
            self._live = None

    def _refresh(self, force: bool = False):
        now = time.monotonic()
        if self._live is not None and (force or now - self._last_draw > 0.2):
            self._live.update(self._render())
            self._last_draw = now

    def train(self, rec):
        self.losses.append(rec["loss"])
        if self.first_loss is None:
            self.first_loss = rec["loss"]
        self.last = rec
        self._refresh(force=rec.get("last", False))

    def eval(self, rec):
        bpb = rec.get("val_bpb")  # None: the data has no bytes per token (alignment): track the loss
        self.val_label = "val bpb" if bpb is not None else "val loss"
        self.val.append((rec["step"], bpb if bpb is not None else rec["val_loss"]))
        self.notes.append(f"eval @ step {rec['step']}: val loss {rec['val_loss']:.4f}"
                          + (f", val bpb {bpb:.4f}" if bpb is not None else ""))
        self._refresh(force=True)

    def note(self, text):
        self.notes.append(text)
        self._refresh(force=True)

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        r = self.last
        if r is None:
            return Panel(Text("starting…"), title=self.title)
        total = self.max_steps
        head = Table.grid(padding=(0, 3))
        for _ in range(4):
            head.add_column()
        step = f"{r['step']}/{total}" if total else str(r["step"])
        best = min(v for _, v in self.val) if self.val else None
        val = f"{self.val[-1][1]:.4f} (best {best:.4f})" if self.val else "-"
        head.add_row("[b]step[/]", step, "[b]loss[/]", f"{r['loss']:.4f} (start {self.first_loss:.3f})")
        label = getattr(self, "val_label", "val bpb")
        head.add_row("[b]lr[/]", f"{r['lr']:.3e}", f"[b]{label}[/]", val)
        head.add_row("[b]tokens/s[/]", fmt_count(r["tokens_per_s"]), "[b]tokens[/]", fmt_count(r["tokens"]))
        head.add_row("[b]elapsed[/]", fmt_duration(r["elapsed_s"]), "[b]ETA[/]", fmt_duration(r.get("eta_s")))
        head.add_row("[b]grad norm[/]", f"{r['grad_norm']:.3f}", "[b]memory[/]", r["memory"])
        width = max(20, min(100, self.console.width - 16))
        parts: list[Any] = [head, Text(""), Text("train loss", style="bold")]
        parts += [Text(line, style="cyan") for line in chart(self.losses, width=width, height=6)]
        if len(self.val) > 1:
            parts += [Text(f"{getattr(self, 'val_label', 'val bpb')}  " + sparkline([v for _, v in self.val][-width:]), style="green")]
        stats = r.get("stats", {})
        if stats:
            st = Table.grid(padding=(0, 2))
            st.add_column(style="bold")
            st.add_column()
            for k, v in stats.items():
                if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
                    for i, row in enumerate(v[:8]):  # e.g. per-layer expert load
                        st.add_row(f"{k}[{i}]", fmt_value(list(row)))
                else:
                    st.add_row(k, fmt_value(v))
            parts += [Text(""), st]
        if self.notes:
            parts += [Text("")] + [Text(n, style="dim") for n in self.notes]
        return Panel(Group(*parts), title=self.title, border_style="blue")


def make_monitor(mode: str, title: str, max_steps: int | None, log_every: int) -> Monitor:
    if mode == "auto":
        mode = "live" if sys.stdout.isatty() and os.environ.get("TERM") != "dumb" else "plain"
    if mode == "live":
        return LiveMonitor(title, max_steps, log_every)
    if mode == "plain":
        return PlainMonitor(title, max_steps, log_every)
    return Monitor(title, max_steps, log_every)
