"""Verifiers: functions that score a response against the known answer, for RL with verifiable rewards.

    reward = Rewards(["exact_numeric", "format"])          # summed, or weighted: weights=[1, 0.2]
    scores = reward(responses, answers)                    # a float per response
    print(reward.report())                                 # verifiers that raised, counted

A verifier is `fn(response: str, answer) -> float`. Built in:
  exact_numeric  1.0 when the response's final number equals the answer (numerically): the number
                 after the last "Answer:" / "答案：" marker, else the last number in the response
  format         1.0 when the response's last line is "Answer: X" or "答案：X" (the format the
                 built-in tasks and their SFT data use, align/tasks.py)
  countdown      1.0 when the expression after the marker uses only the given numbers (each at most
                 once) and + - * / and equals the target; parsed with `ast`, never evaluated as code
Anything else is a Python function named as "module:function" or "path/to/file.py:function".

Text is read after Unicode NFKC normalisation, so full-width digits and colons (１２３, ：) count.
A verifier that raises, or returns something that is not a finite number, scores 0 for that
response and is counted: `report()` says how often and the first error, never a silent drop.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import re
import sys
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from velocis.errors import VelocisError

Verifier = Callable[[str, Any], float]

_MARKER = re.compile(r"(?:answer|答案)\s*:", re.IGNORECASE)  # after NFKC, "：" is ":"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_LAST_LINE = re.compile(r"^(?:answer|答案)\s*:\s*\S.*$", re.IGNORECASE)


def normalize(text: str) -> str:
    """NFKC (full-width digits and punctuation to ASCII) and the Unicode minus sign as '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def _to_number(text: str) -> Fraction:
    text = text.replace(",", "")
    return Fraction(text)  # "12", "-3.5", "7/2"


def final_answer_text(response: str) -> str | None:
    """What follows the last answer marker, or None when there is none."""
    text = normalize(response)
    found = list(_MARKER.finditer(text))
    return text[found[-1].end():].strip() if found else None


def extract_number(response: str) -> Fraction | None:
    """The response's final number: the first number after the last answer marker, else the last number."""
    after = final_answer_text(response)
    if after is not None:
        m = _NUMBER.search(after)
        return _to_number(m.group()) if m else None
    numbers = _NUMBER.findall(normalize(response))
    return _to_number(numbers[-1]) if numbers else None


def exact_numeric(response: str, answer) -> float:
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"the answer {answer!r} is not a number")
    try:
        want = Fraction(answer) if isinstance(answer, (int, float)) else _to_number(normalize(answer).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"the answer {answer!r} is not a number") from None
    got = extract_number(response)
    if got is None:
        return 0.0
    return 1.0 if abs(got - want) <= Fraction(1, 10**6) * max(1, abs(want)) else 0.0


def format_reward(response: str, answer=None) -> float:
    lines = [line.strip() for line in normalize(response).strip().splitlines() if line.strip()]
    return 1.0 if lines and _LAST_LINE.match(lines[-1]) else 0.0


# --- countdown: a safe arithmetic expression evaluator ---------------------------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
MAX_EXPRESSION_CHARS = 200


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """(value, the numbers it uses) of an expression of non-negative integers, + - * / and
    parentheses. Anything else (names, calls, powers, floats) is a ValueError; nothing is executed."""
    expr = normalize(expr).replace("×", "*").replace("÷", "/").strip().rstrip(".。")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {type(node).__name__}")

    return walk(tree), used


def countdown(response: str, answer) -> float:
    if not isinstance(answer, dict) or "target" not in answer or "numbers" not in answer:
        raise ValueError(f"a countdown answer is {{\"target\": N, \"numbers\": [...]}}, got {answer!r}")
    expr = final_answer_text(response)
    if not expr:
        return 0.0
    expr = expr.splitlines()[0]
    if "=" in expr:  # "3 * 7 + 2 = 23": the expression is the left side
        expr = expr.split("=")[0]
    try:
        value, used = evaluate_expression(expr)
    except ValueError:
        return 0.0  # the model wrote something that is not a valid expression: a wrong answer, not an error
    pool = list(answer["numbers"])
    for n in used:
        if n not in pool:
            return 0.0
        pool.remove(n)
    return 1.0 if value == Fraction(answer["target"]) else 0.0


VERIFIERS: dict[str, Verifier] = {"exact_numeric": exact_numeric, "format": format_reward, "countdown": countdown}


def load_function(spec: str) -> Verifier:
    """A Python function named "module:function" or "path/to/file.py:function"."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise VelocisError(f"verifier {spec!r}: name a function as module:function or path/to/file.py:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise VelocisError(f"verifier {spec!r}: no such file {path}")
        mod_name = f"_velocis_verifier_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise VelocisError(f"verifier {spec!r}: importing {path} failed ({type(e).__name__}: {e})") from None
        sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise VelocisError(f"verifier {spec!r}: cannot import module {where!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise VelocisError(f"verifier {spec!r}: {where} has no function {name!r}")
    return fn


def get_verifier(spec: str) -> Verifier:
    if not isinstance(spec, str) or not spec.strip():
        raise VelocisError(f"a verifier is a name or module:function, got {spec!r}")
    spec = spec.strip()
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" in spec:
        return load_function(spec)
    raise VelocisError(f"unknown verifier {spec!r} (--verifier); choose from {', '.join(VERIFIERS)}, or name a "
                       f"Python function as module:function or path/to/file.py:function")


def parse_verifiers(text: str | Sequence[str]) -> list[str]:
    """"exact_numeric,format" -> ["exact_numeric", "format"] (a path may hold no comma)."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    if not names or not all(names):
        raise VelocisError(f"--verifier {text!r}: give one or more verifiers separated by commas")
    return names


class Rewards:
    """The weighted sum of several verifiers' scores; counts every failure of each verifier."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | None = None):
        self.names = list(specs)
        if not self.names:
            raise VelocisError("give at least one verifier (--verifier)")
        self.fns = [get_verifier(s) for s in self.names]
        weights = [1.0] * len(self.names) if weights is None else list(weights)
        if len(weights) != len(self.names) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise VelocisError(f"--reward-weights {weights}: give one finite number per verifier ({len(self.names)})")
        self.weights = [float(w) for w in weights]
        self.errors = {n: 0 for n in self.names}
        self.first_error: dict[str, str] = {}
        self.calls = 0

    def score_one(self, i: int, response: str, answer) -> float:
        name = self.names[i]
        try:
            value = self.fns[i](response, answer)
            if hasattr(value, "item"):  # a numpy or torch scalar
                value = value.item()
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r} ({type(value).__name__}), not a finite number")
            return float(value)
        except Exception as e:  # any failure of the user's code is counted and reported, never silent
            self.errors[name] += 1
            self.first_error.setdefault(name, f"{type(e).__name__}: {e}")
            return 0.0

    def per_verifier(self, responses: Sequence[str], answers: Sequence[Any]) -> list[list[float]]:
        """Each verifier's scores (unweighted): [verifier][response]."""
        self.calls += len(responses)
        return [[self.score_one(i, r, a) for r, a in zip(responses, answers)] for i in range(len(self.names))]

    def combine(self, per_verifier: list[list[float]]) -> list[float]:
        return [sum(w * s[j] for w, s in zip(self.weights, per_verifier)) for j in range(len(per_verifier[0]))]

    def __call__(self, responses: Sequence[str], answers: Sequence[Any]) -> list[float]:
        return self.combine(self.per_verifier(responses, answers))

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def report(self) -> str:
        """One line per verifier that failed (how often, the first error), or '' when none did."""
        return "\n".join(f"verifier {n} failed on {c} of {self.calls} responses (scored 0); first error: "
                         f"{self.first_error[n]}" for n, c in self.errors.items() if c)
