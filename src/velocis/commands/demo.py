"""`velocis demo`: the whole path in a few minutes on a laptop CPU.

Built-in bilingual corpus -> tokenizer -> token shards -> a micro model trained for a fixed number
of steps (watch the live monitor and its ETA) -> a few generated samples from Chinese and English
prompts. Fixed steps and seeds, not a time budget: a slower or busier machine gets the same model
and the same samples, later. Everything lands in runs/demo (re-running starts over there, reusing
the prepared data).
"""
from __future__ import annotations

import time
from pathlib import Path

# Openings the built-in corpus uses, so a few minutes of training can continue them. The Chinese
# ones end on a token boundary (BPE merges whole Chinese phrases; a prompt cut mid-token derails).
PROMPTS = ["从前", "桌子上有十个", "Once upon a time", "The capital of"]
DEMO_STEPS = 400


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on the built-in corpus, then generate (minutes, CPU)",
                       description=__doc__)
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=DEMO_STEPS,
                   help=f"training steps (default {DEMO_STEPS}: about 3 minutes on 2 CPU cores)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--prompt", action="append", help="a prompt to sample (repeatable; default zh + en prompts)")
    p.add_argument("--monitor", choices=["auto", "live", "plain", "none"], default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=run)


def run(args) -> int:
    from velocis.train.run_dir import locked_run_dir

    with locked_run_dir(args.output_dir):
        return _run(args)


def _run(args) -> int:
    from velocis.config import get_preset
    from velocis.data import default_corpus
    from velocis.tokenizer import Tokenizer
    from velocis.train import TrainConfig, train
    from velocis.train.prepare import prepare_run_data

    t_start = time.perf_counter()
    out = Path(args.output_dir)
    print(f"[1/4] writing the built-in corpus to {out / 'corpus'}")
    zh, en = default_corpus.write_default_corpus(out / "corpus")
    print(f"[2/4] tokenizer (vocab {args.vocab_size}) and token shards -> {out / 'data'}")
    data_dir = prepare_run_data(out, [str(zh)], [str(en)], vocab_size=args.vocab_size)
    tok = Tokenizer.load(data_dir)
    model_config = get_preset("micro", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, prompt_start_token_id=tok.eos_id)
    print(f"[3/4] training the micro model for {args.max_steps} steps (Ctrl-C stops early)")
    cfg = TrainConfig(
        output_dir=str(out), data_dir=str(data_dir), max_steps=args.max_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=20, device=args.device,
        compile=args.compile, seed=args.seed, eval_every=args.eval_every, eval_batches=4, save_every=100_000, keep_last=1,
        monitor=args.monitor, log_every=10,
    )
    result = train(cfg, model_config, overwrite=True)
    print(f"      loss {result.first_loss:.3f} -> {result.last_loss:.3f} in {result.step} steps"
          + (f"; val bits/byte {result.val[0][2]:.3f} -> {result.val[-1][2]:.3f}" if result.val else ""))

    print(f"[4/4] samples from {out}")
    import velocis

    model, tokenizer = velocis.load(out)
    for i, prompt in enumerate(args.prompt or PROMPTS):
        text = velocis.generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                                temperature=0.7, top_k=40, seed=args.seed + i)
        print(f"  > {prompt}{text}".replace("\n", " "))
    print(f"demo done in {(time.perf_counter() - t_start) / 60:.1f} min; curves: {out / 'curves.png'}; "
          f"more: velocis generate --model {out} --prompt '...'")
    return 0
