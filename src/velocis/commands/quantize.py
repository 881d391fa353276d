"""`velocis quantize --model DIR --bits 4|8`: weight-only int8 / int4 quantization of a model directory.

Writes a Velocis model directory (model.safetensors + config.json with `quantization` + tokenizer
files) that velocis.load, `velocis generate` and the rest load unchanged. Layout and rules:
velocis/quant/formats.py (tensors) and velocis/quant/swap.py (which modules).
"""
from __future__ import annotations

import sys

OVERWRITE_HELP = ("write into --output even if it holds other files (only the model's own files are "
                  "replaced; nothing else is deleted)")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization (round-to-nearest or GPTQ)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="float model: Velocis model / run dir or Hugging Face dir")
    p.add_argument("--bits", required=True, type=int, metavar="4|8", help="4: int4 (two per byte), 8: int8")
    p.add_argument("--group-size", type=int, default=None, metavar="32|64|128",
                   help="input columns per scale (default: per output channel for int8, 32 for int4)")
    p.add_argument("--symmetric", action="store_true",
                   help="int4 without zero points (codes -8..7); int8 is always symmetric")
    p.add_argument("--method", default="rtn", metavar="rtn|gptq",
                   help="rtn: round to nearest (default); gptq: GPTQ error compensation on --calibration text")
    p.add_argument("--calibration", metavar="FILE", help="GPTQ: a UTF-8 text file in the model's language(s)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N",
                   help="GPTQ: calibration sequences (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=None, metavar="T",
                   help="GPTQ: tokens per sequence (default min(512, the model's context))")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ: dampening, a fraction of mean(diag H) (default 0.01)")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="directory to write (default: DIR-int4-g32 etc. next to --model)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=run)


def _default_output(args) -> str:
    base = str(args.model).rstrip("/\\") or "model"
    g = "" if args.group_size is None else f"-g{args.group_size}"
    return f"{base}-int{args.bits}{g}{'-sym' if args.bits == 4 and args.symmetric else ''}" + (
        "-gptq" if args.method == "gptq" else "")


def _check_input(path) -> None:
    """Refuse an already quantized model before loading it."""
    import json
    from pathlib import Path

    from velocis.errors import VelocisError

    p = Path(path)
    if not p.exists():
        raise VelocisError(f"--model {p}: no such directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise VelocisError(f"--model {p}: no config.json; pass a Velocis model, run or Hugging Face directory")
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise VelocisError(f"--model {p}: config.json is not valid JSON ({e})") from None
    q = d.get("quantization") or d.get("quantization_config")
    if q:
        what = (f"int{q.get('bits')} {q.get('method', q.get('quant_method', ''))}".strip()
                if isinstance(q, dict) else "quantized")
        raise VelocisError(f"--model {p} is already quantized ({what}); quantize the original float model instead")


def run(args) -> int:
    import os
    import time

    import torch

    from velocis.errors import VelocisError
    from velocis.model_io import MODEL_FILES, WEIGHTS, is_velocis_dir, load_model_dir, model_state, save_model
    from velocis.quant.formats import METHODS, QSpec
    from velocis.utils.output_dir import check_not_input, check_output_dir

    # every check before the (slow) load
    if args.method not in METHODS:
        raise VelocisError(f"--method {args.method!r} must be one of {', '.join(METHODS)}")
    if args.bits == 8 and args.symmetric:
        args.symmetric = False  # int8 is always symmetric: the flag changes nothing
    if args.bits == 4 and args.group_size is None:
        args.group_size = 32
    symmetric = True if args.bits == 8 else args.symmetric
    QSpec(args.bits, args.group_size, symmetric)  # unsupported bits / group size: a one-line error
    if args.method == "gptq" and not args.calibration:
        raise VelocisError("--method gptq needs --calibration FILE (text in the model's language: a few hundred "
                           "sequences of its context are plenty)")
    if args.method == "rtn" and args.calibration:
        raise VelocisError("--calibration is used by --method gptq only; drop it, or add --method gptq")
    if args.calibration:
        from pathlib import Path

        if not Path(args.calibration).is_file():
            raise VelocisError(f"--calibration {args.calibration}: no such file")
    _check_input(args.model)
    out = args.output or _default_output(args)
    check_not_input(out, args.model, "--model")
    check_output_dir(out, MODEL_FILES, "a Velocis model", args.overwrite, is_own=is_velocis_dir)

    t0 = time.perf_counter()
    if is_velocis_dir(args.model):
        model, tok = load_model_dir(args.model, device="cpu")  # the stored precision
    else:
        from velocis.interop.hf import load_hf

        model, tok = load_hf(args.model, device="cpu")
    calib, info = None, None
    if args.method == "gptq":
        from velocis.quant.gptq import load_calibration

        if tok is None:
            raise VelocisError(f"--model {args.model} has no tokenizer (tokenizer.json) to tokenize the "
                               f"calibration text")
        seq_len = args.calib_seq_len or min(512, model.config.max_seq_len)
        if seq_len > model.config.max_seq_len:
            raise VelocisError(f"--calib-seq-len {seq_len} exceeds the model's context ({model.config.max_seq_len})")
        calib = load_calibration(args.calibration, tok, args.calib_samples, seq_len)
        # the file name only: no local paths in a model that may be shared
        info = {"file": os.path.basename(args.calibration), "sequences": int(calib.shape[0]),
                "seq_len": int(calib.shape[1]), "damp": args.damp}
        print(f"calibration: {calib.shape[0]} sequences x {calib.shape[1]} tokens from {args.calibration}",
              file=sys.stderr)
    from velocis.quant.swap import quantize_model

    float_bytes = sum(t.numel() * t.element_size() for t in model_state(model).values())
    gptq = {"damp": args.damp} if args.method == "gptq" else {}
    with torch.no_grad():
        quantize_model(model, bits=args.bits, group_size=args.group_size, symmetric=symmetric, method=args.method,
                       calibration=calib, calibration_info=info, **gptq)
    save_model(model, tok, out, overwrite=args.overwrite)
    q = model.config.quantization
    from pathlib import Path

    size = (Path(out) / WEIGHTS).stat().st_size
    g = "per-channel" if q["group_size"] is None else f"g{q['group_size']}"
    print(f"quantized {args.model} -> {out}: int{q['bits']} {g} {'symmetric' if q['symmetric'] else 'asymmetric'} "
          f"{q['method']}, {len(q['modules'])} modules; weights {float_bytes / 1e6:.1f} MB -> {size / 1e6:.1f} MB "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
