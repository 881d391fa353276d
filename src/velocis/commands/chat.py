"""`velocis chat --model DIR`: chat in the terminal with the model's chat template; replies stream,
the history is kept (/reset clears it, /exit or Ctrl-D ends). Reads lines from stdin, so a conversation
can be piped in."""
from __future__ import annotations

import sys

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streams replies, keeps the history)")
    p.add_argument("--model", required=True, metavar="DIR", help="Velocis model / run dir or Hugging Face dir")
    p.add_argument("--system", default=None, help="a system message put first in the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length at most, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="0 or -1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precision to compute in (default auto: fp32 on a CPU, bf16 on a GPU that has it)")
    p.set_defaults(func=run)


def _lines(tty: bool):
    """Input lines: input() with a prompt on a terminal (line editing), plain stdin when piped."""
    if tty:
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def run(args) -> int:
    from velocis.errors import VelocisError
    from velocis.infer.sampling import SamplingParams
    from velocis.serve.model import ServedModel
    from velocis.serve.server import build_engine

    base = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens)  # every flag checked before the slow load
    served = ServedModel.load(args.model, device=args.device, dtype=args.dtype)
    if served.chat is None:
        raise VelocisError(f"{args.model}: this model has no chat template (tokenizer_config.json \"chat_template\") "
                           "and its tokenizer no role tokens; use `velocis generate`")
    base.stop_token_ids = sorted(set(served.chat.stop_token_ids) | set(served.stop_token_ids))
    engine = build_engine(served, max_num_seqs=1)
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")
    tty = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    if tty:
        print(f"chatting with {served.name}; {HELP}", file=sys.stderr)
    for line in _lines(tty):
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(system)
            print("[conversation cleared]", file=sys.stderr if tty else out, flush=True)
            continue
        if command == "/help" or (command.startswith("/") and " " not in command):
            print(HELP if command == "/help" else f"unknown command {command}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = served.prompt_ids(served.chat_prompt(history))
        room = served.context - len(ids)
        if room < 1:
            history.pop()
            print(f"[the conversation is {len(ids)} tokens, over the model's context of {served.context}: "
                  f"/reset it]", file=sys.stderr, flush=True)
            continue
        params = SamplingParams(**{**vars(base), "max_tokens": min(args.max_tokens, room)})
        try:
            rid = engine.add_request(ids, params)
        except VelocisError as e:  # e.g. more than the KV cache holds: say so, keep chatting
            history.pop()
            print(f"[{e}]", file=sys.stderr, flush=True)
            continue
        reply = ""
        try:
            while engine.has_unfinished():
                for o in engine.step():
                    out.write(o.delta)
                    out.flush()
                    reply = o.text
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            engine.abort(rid)
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
    return 0
