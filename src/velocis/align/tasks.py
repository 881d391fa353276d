"""Built-in tasks with verifiable answers, so alignment can be seen working on one CPU machine.

    train, held_out = make_task("arithmetic", difficulty=1).generate(n_train=5000, n_eval=200, seed=0)
    write_task("arithmetic", "data/arith", n_train=5000, n_eval=200, seed=0)   # train/eval/sft jsonl

Each example is {"prompt": str, "answer": ...}: the `prompt`/`answer` jsonl that `velocis
train-grpo` reads, scored by a named verifier (align/verifiers.py). The splits are deterministic
in the seed, and no problem of the held-out split appears in the training split (the problem,
not its phrasing, is what must be new). Prompts come in English and Chinese phrasings.

The answer format every task and its SFT data use: the response's last line is
"Answer: X" (English prompts) or "答案：X" (Chinese prompts), X the number (arithmetic) or the
expression (countdown). The `format` verifier checks that line; the others read X from it.

  arithmetic  multi-digit + - ×; `difficulty` 1 (1-2 digit addition) .. 5 (5 digits, 3x2-digit ×)
  countdown   reach a target from given numbers with + - * /, each number at most once; the answer
              is an expression (checked by parsing, never by eval)

`sft_record(example)` is the same problem as a `messages` conversation with a worked answer
(what `velocis sft` reads), and `pretrain_text(example)` the problem and its working as plain
text, so pretraining + SFT can bootstrap a model that RL then improves.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable

from velocis.errors import VelocisError

ANSWER_MARKERS = {"en": "Answer: ", "zh": "答案："}
LANGS = ("en", "zh", "mix")


@dataclass
class Problem:
    """One generated problem: what the model is asked, the verifiable answer, and a worked response."""
    key: tuple  # identity of the problem, independent of phrasing (train and held-out never share one)
    prompt: str
    answer: Any
    response: str  # a correct worked answer in the task's format (for SFT / pretraining text)
    lang: str

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer}


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise VelocisError(f"{name} must be an integer in {rng}, got {value!r}")
    return value


def _pick_lang(rng: random.Random, lang: str) -> str:
    return rng.choice(("en", "zh")) if lang == "mix" else lang


# --- arithmetic --------------------------------------------------------------------------------
# difficulty -> the operations drawn from, each with the digits of its two operands
ARITHMETIC_LEVELS = {
    1: [("+", 2, 2)],
    2: [("+", 2, 2), ("-", 2, 2)],
    3: [("+", 3, 3), ("-", 3, 3), ("×", 2, 1)],
    4: [("+", 4, 4), ("-", 4, 4), ("×", 2, 2)],
    5: [("+", 5, 5), ("-", 5, 5), ("×", 3, 2)],
}
_ARITH_EN = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "{q} = ?")
_ARITH_ZH = ("计算 {q} 等于多少？", "{q} 等于多少？", "请计算：{q}", "求 {q} 的值。")


def _multiply_steps(a: int, b: int) -> str:
    """a × b worked by the place values of b: 37 × 85 = 37 × 80 + 37 × 5 = 2960 + 185 = 3145."""
    parts = [int(d) * 10 ** i for i, d in enumerate(reversed(str(b))) if d != "0"][::-1]
    if len(parts) <= 1:
        return f"{a} × {b} = {a * b}"
    split = " + ".join(f"{a} × {p}" for p in parts)
    products = " + ".join(str(a * p) for p in parts)
    return f"{a} × {b} = {split} = {products} = {a * b}"


class ArithmeticTask:
    name = "arithmetic"
    verifier = "exact_numeric"  # what held-out accuracy counts

    def __init__(self, difficulty: int = 1, lang: str = "mix"):
        self.difficulty = _check_int("difficulty (--difficulty)", difficulty, 1, max(ARITHMETIC_LEVELS))
        if lang not in LANGS:
            raise VelocisError(f"lang (--lang) {lang!r} must be one of {', '.join(LANGS)}")
        self.lang = lang
        self.ops = ARITHMETIC_LEVELS[difficulty]

    def options(self) -> dict[str, Any]:
        return {"difficulty": self.difficulty, "lang": self.lang}

    def space_size(self) -> int:
        return sum(10 ** da * 10 ** db for _, da, db in self.ops)

    def draw_key(self, rng: random.Random) -> tuple:
        op, da, db = rng.choice(self.ops)
        return (rng.randrange(10 ** da), op, rng.randrange(10 ** db))

    def problem(self, key: tuple, rng: random.Random) -> Problem:
        a, op, b = key
        result = a + b if op == "+" else a - b if op == "-" else a * b
        q = f"{a} {op} {b}"
        lang = _pick_lang(rng, self.lang)
        prompt = rng.choice(_ARITH_EN if lang == "en" else _ARITH_ZH).format(q=q)
        work = _multiply_steps(a, b) if op == "×" else f"{q} = {result}"
        stop = "." if lang == "en" else "。"
        response = f"{work}{stop}\n{ANSWER_MARKERS[lang]}{result}"
        return Problem(key, prompt, str(result), response, lang)


# --- countdown ---------------------------------------------------------------------------------
COUNTDOWN_LEVELS = {  # difficulty -> (how many numbers, largest number)
    1: (3, 10),
    2: (3, 25),
    3: (4, 25),
    4: (4, 50),
    5: (5, 100),
}
_CD_EN = ("Using the numbers {nums}, make {target}. Use + - * / and each number at most once.",
          "Reach {target} from {nums} with + - * / (each number at most once).")
_CD_ZH = ("用数字 {nums} 凑出 {target}，可以使用 + - * /，每个数字最多用一次。",
          "用 {nums} 通过 + - * / 得到 {target}（每个数字最多用一次）。")


class CountdownTask:
    name = "countdown"
    verifier = "countdown"

    def __init__(self, difficulty: int = 1, lang: str = "mix"):
        self.difficulty = _check_int("difficulty (--difficulty)", difficulty, 1, max(COUNTDOWN_LEVELS))
        if lang not in LANGS:
            raise VelocisError(f"lang (--lang) {lang!r} must be one of {', '.join(LANGS)}")
        self.lang = lang
        self.count, self.largest = COUNTDOWN_LEVELS[difficulty]

    def options(self) -> dict[str, Any]:
        return {"difficulty": self.difficulty, "lang": self.lang}

    def space_size(self) -> int:
        return self.largest ** self.count * 50  # numbers x a spread of reachable targets (a rough size)

    def _solution(self, nums: list[int], rng: random.Random) -> tuple[str, int] | None:
        """A random expression over all of `nums` whose value (and every step's) is a positive integer."""
        items = [(str(n), Fraction(n)) for n in nums]
        rng.shuffle(items)
        while len(items) > 1:
            (ea, va), (eb, vb) = items.pop(), items.pop()
            choices = [("+", va + vb), ("*", va * vb)]
            if va - vb > 0:
                choices.append(("-", va - vb))
            if vb != 0 and (va / vb).denominator == 1 and vb != 1:
                choices.append(("/", va / vb))
            op, value = rng.choice(choices)
            wrap = (lambda e: f"({e})" if " " in e else e)
            items.append((f"{wrap(ea)} {op} {wrap(eb)}", value))
        expr, value = items[0]
        if value.denominator != 1 or not 0 < value <= 1000:
            return None
        return expr, int(value)

    def draw_key(self, rng: random.Random) -> tuple:
        while True:
            nums = sorted(rng.randint(1, self.largest) for _ in range(self.count))
            found = self._solution(nums, rng)
            if found is not None:
                return (tuple(nums), found[1], found[0])

    def problem(self, key: tuple, rng: random.Random) -> Problem:
        nums, target, expr = key
        lang = _pick_lang(rng, self.lang)
        shown = list(nums)
        rng.shuffle(shown)
        sep = ", " if lang == "en" else "、"
        prompt = rng.choice(_CD_EN if lang == "en" else _CD_ZH).format(nums=sep.join(map(str, shown)), target=target)
        stop = "." if lang == "en" else "。"
        response = f"{expr} = {target}{stop}\n{ANSWER_MARKERS[lang]}{expr}"
        return Problem((nums, target), prompt, {"target": target, "numbers": list(nums)}, response, lang)


TASKS: dict[str, Callable[..., Any]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, **options):
    if name not in TASKS:
        raise VelocisError(f"unknown task {name!r} (--task); choose one of {', '.join(TASKS)}")
    return TASKS[name](**{k: v for k, v in options.items() if v is not None})


def generate(task, n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems, deterministic in `seed`. The held-out problems are distinct; the
    training problems are drawn (with repeats, when the space is small) from the rest."""
    _check_int("n_train (--n-train)", n_train, 0)
    _check_int("n_eval (--n-eval)", n_eval, 0)
    _check_int("seed (--seed)", seed, 0)
    if n_eval > task.space_size() // 2:
        raise VelocisError(f"n_eval (--n-eval) {n_eval} is too many held-out problems for {task.name} at difficulty "
                           f"{task.difficulty} (about {task.space_size()} distinct problems); ask for at most "
                           f"{task.space_size() // 2} or raise the difficulty")
    rng = random.Random(f"{task.name}-{seed}-eval")
    held_out, seen = [], set()
    while len(held_out) < n_eval:
        key = task.draw_key(rng)
        p = task.problem(key, rng)
        if p.key not in seen:
            seen.add(p.key)
            held_out.append(p)
    rng = random.Random(f"{task.name}-{seed}-train")
    train = []
    while len(train) < n_train:
        p = task.problem(task.draw_key(rng), rng)
        if p.key not in seen:
            train.append(p)
    return train, held_out


# --- records on disk ------------------------------------------------------------------------------
def sft_record(problem: Problem) -> dict[str, Any]:
    """The problem as a `messages` conversation whose assistant turn is the worked answer."""
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": problem.response}]}


def pretrain_text(problem: Problem) -> str:
    """The problem and its working as one plain-text document (no chat markup)."""
    return f"{problem.prompt}\n{problem.response}"


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


TASK_FILES = ("train.jsonl", "eval.jsonl", "sft.jsonl", "sft_eval.jsonl", "pretrain_en.txt", "pretrain_zh.txt",
              "task.json")


def write_task(name: str, out_dir: str | Path, n_train: int = 5000, n_eval: int = 200, seed: int = 0,
               overwrite: bool = False, **options) -> Path:
    """Write a task's data into `out_dir`, each file atomically:
    train.jsonl / eval.jsonl (prompt + answer), sft.jsonl / sft_eval.jsonl (the same problems as
    `messages` with worked answers), pretrain_en.txt / pretrain_zh.txt (the training problems with
    their working as plain-text documents, one per paragraph, for `velocis train-custom`) and
    task.json (what was generated, to regenerate it)."""
    from velocis.utils.atomic import atomic_files
    from velocis.utils.output_dir import check_output_dir

    task = make_task(name, **options)
    train, held_out = generate(task, n_train, n_eval, seed)
    previous = check_output_dir(out_dir, TASK_FILES, "a task's data", overwrite, flag="--output-dir")
    meta = {"task": name, "seed": seed, "n_train": n_train, "n_eval": n_eval, **task.options(),
            "verifier": task.verifier}
    with atomic_files(out_dir, replace=previous) as tmp:
        (tmp / "train.jsonl").write_text(_jsonl(p.record() for p in train), encoding="utf-8")
        (tmp / "eval.jsonl").write_text(_jsonl(p.record() for p in held_out), encoding="utf-8")
        (tmp / "sft.jsonl").write_text(_jsonl(sft_record(p) for p in train), encoding="utf-8")
        (tmp / "sft_eval.jsonl").write_text(_jsonl(sft_record(p) for p in held_out), encoding="utf-8")
        for lang in ("en", "zh"):
            docs = [pretrain_text(p) for p in train if p.lang == lang]
            (tmp / f"pretrain_{lang}.txt").write_text("".join(d + "\n\n" for d in docs), encoding="utf-8")
        (tmp / "task.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out_dir)


def read_examples(path: str | Path, flag: str = "--data") -> list[dict[str, Any]]:
    """A `prompt`/`answer` jsonl: the prompt a string or a list of OpenAI-style messages. A line
    that is not such a record is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise VelocisError(f"{flag} {path}: no such file; write one with `velocis task write` or give a "
                           f"prompt/answer jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise VelocisError(f"{flag} {path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
                raise VelocisError(f"{flag} {path} line {n}: each line needs a \"prompt\" and an \"answer\" "
                                   f"(got {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})")
            prompt = rec["prompt"]
            ok = isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
            if not ok:
                raise VelocisError(f"{flag} {path} line {n}: \"prompt\" must be a non-empty string or a list of "
                                   f"{{\"role\", \"content\"}} messages")
            out.append(rec)
    if not out:
        raise VelocisError(f"{flag} {path}: no examples in the file")
    return out


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
