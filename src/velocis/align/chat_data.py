"""Chat data for SFT: `messages` jsonl -> token ids with an assistant-only target mask -> rows that
pack several conversations, each with its own positions, so attention and loss stay inside it.

    fmt = ChatFormat.from_model_dir("runs/base")      # tokenizer + chat template + prompt-start token
    data, report = chat_train_data("chat.jsonl", fmt, seq_len=512, batch_size=8, seed=0)
    Trainer(cfg, model_config, objective=SFTObjective(), data=data).run()

Input: one conversation per line (blank lines are skipped)
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "...", "completion": "..."}          # or "response"; either may be a message list too
"developer" is taken as the system role; a content may be a list of {"type": "text", "text": ...} parts.

Rendering and mask. A conversation is rendered by the model's chat template (serve/chat_template.py,
which renders as transformers' apply_chat_template does) and tokenized as one text, so its ids are
those transformers gives; it starts with the model's prompt-start token, as a served prompt does
(serve/model.py). Assistant turn i scores the text between messages[:i] rendered with the generation
prompt and messages[:i+1] rendered, i.e. its reply, up to and including the turn's stop token
(<|end|>; EOS for a template of its own), mapped to tokens as transformers maps a {% generation %}
span (the tokens holding its first to its last character). Every assistant turn is scored; system and
user turns, role headers and the newline after <|end|> are not: the model learns exactly what it
generates at inference, up to where it stops.

Bad input is reported, never dropped silently: a line that is not JSON, has no messages, an unknown
role or no assistant turn is an error naming file:line; a conversation longer than seq_len is skipped
and counted (ChatDataReport.too_long, which `velocis sft` prints at the start and the end); an empty
file, or one in which nothing fits, is an error.

Packing (PackedChatLoader): each epoch the conversations, shuffled with (seed, epoch), are packed
first-fit into rows of seq_len tokens (over a bounded set of open rows, so the order stays random).
Positions restart at 0 at each conversation, which makes the model keep attention inside it
(models/positions.py), and a conversation's last position has no target (the next token is another
conversation's). Padding is a document of its own with no targets. A batch is (input_ids, targets,
positions), LongTensors [B, T], targets the next token where it is scored and -100 elsewhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from velocis.errors import VelocisError
from velocis.train.data_source import TrainData

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
OPEN_ROWS = 64  # rows the packer keeps open: more packs tighter, fewer keeps the order more random


# --- the model's chat format ---------------------------------------------------------------------------
@dataclass
class ChatFormat:
    tokenizer: Any  # velocis.tokenizer.Tokenizer
    template: Any  # velocis.serve.chat_template.ChatTemplate
    prompt_start: int | None = None  # a conversation's first token (the model's prompt_start_token_id)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatFormat":
        """The tokenizer, chat template and prompt-start token of a model dir."""
        from velocis.config import ModelConfig
        from velocis.model_io import load_tokenizer
        from velocis.serve.chat_template import find_chat_template

        model_dir = Path(model_dir)
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise VelocisError(f"{model_dir}: no tokenizer.json; SFT needs the model's tokenizer")
        template = find_chat_template(model_dir, tokenizer)
        if template is None:
            raise VelocisError(f"{model_dir}: the model has no chat template (tokenizer_config.json \"chat_template\") "
                               f"and its tokenizer no role tokens; add a template to tokenizer_config.json")
        start = None
        if (model_dir / "config.json").is_file():
            start = ModelConfig.load(model_dir / "config.json").prompt_start_token_id
        # the trainer's rule (train/loop.py fill_special_ids): a prompt starts after an EOS
        return cls(tokenizer, template, start if start is not None else tokenizer.eos_id)

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end an assistant turn: the template's (<|end|>) and EOS."""
        return {i for i in (*self.template.stop_token_ids, self.tokenizer.eos_id) if i is not None}


@dataclass
class Conversation:
    ids: np.ndarray  # int64 [L]
    mask: np.ndarray  # bool [L]: token j is scored (as the target of position j - 1)
    where: str  # file:line


# --- reading --------------------------------------------------------------------------------------
def _text(content, where: str, k: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise VelocisError(f"{where}: message {k}'s content must be a string (or a list of {{\"type\": \"text\"}} "
                       f"parts), got {type(content).__name__}")


def _as_turns(value, role: str, where: str, key: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise VelocisError(f"{where}: \"{key}\" must be a string or a list of messages, got {type(value).__name__}")


def parse_conversation(obj, where: str) -> list[dict]:
    """A jsonl record -> its validated messages [{"role", "content"}], or a VelocisError naming `where`."""
    if not isinstance(obj, dict):
        raise VelocisError(f"{where}: expected a JSON object with \"messages\", got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj and ("completion" in obj or "response" in obj):
        key = "completion" if "completion" in obj else "response"
        messages = _as_turns(obj["prompt"], "user", where, "prompt") + _as_turns(obj[key], "assistant", where, key)
    else:
        raise VelocisError(f"{where}: no \"messages\" list (nor \"prompt\" with \"completion\"); one conversation "
                           f"per line: {{\"messages\": [{{\"role\": \"user\", \"content\": ...}}, ...]}}")
    if not isinstance(messages, list) or not messages:
        raise VelocisError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise VelocisError(f"{where}: message {k} must be an object with \"role\" and \"content\"")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ROLES:
            raise VelocisError(f"{where}: message {k} has the unknown role {m['role']!r}; the roles are "
                               f"system, user and assistant")
        out.append({"role": role, "content": _text(m.get("content"), where, k)})
    if not any(m["role"] == "assistant" for m in out):
        raise VelocisError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained; "
                           f"add the assistant's reply or remove the line")
    return out


def read_conversations(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(file:line, messages) of every conversation in a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise VelocisError(f"--data {path}: no such file; give a jsonl file with one {{\"messages\": [...]}} per line")
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise VelocisError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
                out.append((where, parse_conversation(obj, where)))
    except UnicodeDecodeError as e:
        raise VelocisError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from None
    if not out:
        raise VelocisError(f"{path}: no conversations (the file is empty); one {{\"messages\": [...]}} per line")
    return out


# --- rendering: ids and the assistant mask -----------------------------------------------------------------
def assistant_spans(fmt: ChatFormat, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the [start, end) characters of its reply."""
    def render(msgs, gen):
        try:
            return fmt.template.render(msgs, add_generation_prompt=gen)
        except VelocisError as e:
            raise VelocisError(f"{where}: {e}") from None

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise VelocisError(f"{where}: the chat template renders earlier turns differently once later ones "
                               f"follow, so assistant turn {i} cannot be found in the conversation; SFT needs a "
                               f"template that renders turn by turn")
        spans.append((len(before), len(upto)))
    return full, spans


def render_conversations(fmt: ChatFormat, records: list[tuple[str, list[dict]]]) -> list[Conversation]:
    """Token ids and assistant masks of conversations (one batched tokenizer call)."""
    rendered = [assistant_spans(fmt, messages, where) for where, messages in records]
    encodings = fmt.tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    stop = fmt.stop_ids
    out = []
    for (where, _), (_, spans), enc in zip(records, rendered, encodings):
        ids = np.asarray(enc.ids, dtype=np.int64)
        starts = np.asarray([a for a, _ in enc.offsets], dtype=np.int64)
        ends = np.asarray([b for _, b in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            held = np.flatnonzero((starts < e) & (ends > s))  # the tokens holding the reply's characters
            if not len(held):
                continue
            t0, t1 = int(held[0]), int(held[-1])
            stops = [t for t in range(t0, t1 + 1) if int(ids[t]) in stop]
            mask[t0: (stops[-1] if stops else t1) + 1] = True  # nothing after the turn's stop token
        if fmt.prompt_start is not None and (not len(ids) or int(ids[0]) != fmt.prompt_start):
            ids = np.concatenate([[fmt.prompt_start], ids]).astype(np.int64)
            mask = np.concatenate([[False], mask])
        out.append(Conversation(ids, mask, where))
    return out


# --- packing ---------------------------------------------------------------------------------------
def pack_rows(lengths: np.ndarray, order, seq_len: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """First-fit of the conversations, in `order`, into rows of seq_len tokens; returns each row's
    conversation indices. At most `open_rows` rows take new conversations: when one more is needed the
    fullest leaves, and a row leaves as soon as it is full."""
    done: list[list[int]] = []
    rows: list[list] = []  # [free tokens, [indices]]
    for i in order:
        n = int(lengths[i])
        for k, row in enumerate(rows):
            if row[0] >= n:
                row[0] -= n
                row[1].append(int(i))
                if row[0] == 0:
                    done.append(rows.pop(k)[1])
                break
        else:
            if len(rows) >= open_rows:
                fullest = min(range(len(rows)), key=lambda j: rows[j][0])
                done.append(rows.pop(fullest)[1])
            if n == seq_len:
                done.append([int(i)])
            else:
                rows.append([seq_len - n, [int(i)]])
    done.extend(row[1] for row in rows)
    return done


class PackedChatLoader:
    """Packed conversation rows as (input_ids, targets, positions) batches; resumable (epoch, step).

    train: reshuffled and repacked each epoch with (seed, epoch), forever; rank r of world_size takes
    every world_size-th row and every rank yields the same number of batches per epoch (a rank short of
    rows gets a row of padding, which scores nothing). The last batch of an epoch may be smaller: no
    conversation is left out. val: the conversations in file order, one pass per iteration."""

    def __init__(self, conversations: list[Conversation], seq_len: int, batch_size: int, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1, pad_id: int = 0):
        if split not in ("train", "val"):
            raise VelocisError(f"split {split!r} must be 'train' or 'val'")
        if seq_len < 2 or batch_size < 1:
            raise VelocisError(f"seq_len ({seq_len}) must be at least 2 and batch_size ({batch_size}) positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VelocisError(f"rank {rank} must be in 0..world_size-1 (world_size {world_size})")
        if not conversations:
            raise VelocisError(f"the {split} split has no conversations")
        self.conversations = conversations
        self.lengths = np.asarray([len(c.ids) for c in conversations], dtype=np.int64)
        too_long = int(np.argmax(self.lengths))
        if self.lengths[too_long] > seq_len:
            raise VelocisError(f"{conversations[too_long].where}: {self.lengths[too_long]} tokens do not fit rows of "
                               f"seq_len {seq_len}")
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        self.epoch, self.step = 0, 0
        self._packed: tuple[int, list[list[int]]] | None = None  # (epoch, rows), the last one packed

    # -- which rows ----------------------------------------------------------------------------------
    def rows(self, epoch: int) -> list[list[int]]:
        """Every rank's rows of `epoch` (conversation indices), in reading order."""
        key = epoch if self.split == "train" else 0
        if self._packed is None or self._packed[0] != key:
            n = len(self.conversations)
            order = np.random.default_rng([self.seed, key]).permutation(n) if self.split == "train" else range(n)
            self._packed = (key, pack_rows(self.lengths, order, self.seq_len))
        return self._packed[1]

    def batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's batches of `epoch`, each a list of rows."""
        rows = self.rows(epoch)
        mine = rows[self.rank:: self.world_size]
        per_rank = -(-len(rows) // self.world_size)
        count = -(-per_rank // self.batch_size)
        out = [mine[i * self.batch_size: (i + 1) * self.batch_size] for i in range(count)]
        return [b if b else [[]] for b in out]  # a rank short of rows: one padding row

    def fill(self, epoch: int = 0) -> float:
        """Share of the row positions that hold conversation tokens (the rest is padding)."""
        rows = self.rows(epoch)
        return float(self.lengths.sum()) / (len(rows) * self.seq_len)

    # -- building a batch ------------------------------------------------------------------------------
    def batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = self.seq_len
        inputs = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), T), dtype=np.int64)
        for r, row in enumerate(rows):
            o = 0
            for i in row:
                c = self.conversations[i]
                n = len(c.ids)
                inputs[r, o: o + n] = c.ids
                positions[r, o: o + n] = np.arange(n)
                targets[r, o: o + n - 1] = np.where(c.mask[1:], c.ids[1:], IGNORE_INDEX)
                o += n
            positions[r, o:] = np.arange(T - o)  # padding: a document of its own, never scored
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(positions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            batches = self.batches(self.epoch)
            while self.step < len(batches):
                rows = batches[self.step]
                self.step += 1  # advanced before yielding: the state then points at the next batch
                yield self.batch(rows)
            self.epoch, self.step = self.epoch + 1, 0
            if self.split != "train":
                return

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    # -- exact resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "split": self.split, "num_conversations": len(self.conversations),
                "num_tokens": int(self.lengths.sum())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "batch_size", "world_size", "split", "seed", "num_conversations", "num_tokens"):
            if key in state and state[key] != mine[key]:
                raise VelocisError(f"the saved data position was taken with {key}={state[key]}, this loader has "
                                   f"{mine[key]}; resume with the same --data file and settings")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# --- a TrainData of a jsonl file --------------------------------------------------------------------------
@dataclass
class ChatDataReport:
    path: str
    seq_len: int
    conversations: int = 0  # read from the file
    train: int = 0
    val: int = 0
    assistant_turns: int = 0
    tokens: int = 0  # of the conversations kept
    assistant_tokens: int = 0  # scored, of the conversations kept
    rows: int = 0  # train rows of the first epoch
    fill: float = 0.0  # their share of conversation tokens
    too_long: list[tuple[str, int]] = field(default_factory=list)  # skipped: (file:line, tokens)

    def skipped(self) -> str:
        if not self.too_long:
            return ""
        where, n = self.too_long[0]
        return (f"skipped {len(self.too_long)} of {self.conversations} conversations longer than seq_len "
                f"{self.seq_len} tokens (the first: {where}, {n} tokens); raise --seq-len to keep them")

    def summary(self) -> str:
        text = (f"{self.path}: {self.conversations} conversations ({self.train} train, {self.val} val), "
                f"{self.assistant_turns} assistant turns, {self.tokens:,} tokens of which {self.assistant_tokens:,} "
                f"are scored; {self.rows} rows of {self.seq_len} tokens per epoch, {self.fill:.0%} filled")
        return text + (f"; {self.skipped()}" if self.too_long else "")


def chat_train_data(path: str | Path, fmt: ChatFormat, seq_len: int, batch_size: int, *, seed: int = 0,
                    val_fraction: float = 0.05, rank: int = 0, world_size: int = 1) -> tuple[TrainData, ChatDataReport]:
    """A jsonl file of conversations -> the trainer's TrainData (packed train and val loaders) and a report.
    The val split is val_fraction of the conversations (at least one when there are two or more; none
    with val_fraction 0), drawn with the seed."""
    if not 0 <= val_fraction < 1:
        raise VelocisError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    records = read_conversations(path)
    conversations = render_conversations(fmt, records)
    report = ChatDataReport(str(path), seq_len, conversations=len(conversations))
    kept = []
    for c, (_, messages) in zip(conversations, records):
        if len(c.ids) > seq_len:
            report.too_long.append((c.where, len(c.ids)))
            continue
        kept.append(c)
        report.assistant_turns += sum(m["role"] == "assistant" for m in messages)
        report.tokens += len(c.ids)
        report.assistant_tokens += int(c.mask.sum())
    if not kept:
        shortest = min(n for _, n in report.too_long)
        raise VelocisError(f"{path}: every conversation is longer than seq_len {seq_len} tokens (the shortest has "
                           f"{shortest}); raise --seq-len (at most the model's context)")
    n = len(kept)
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(n * val_fraction)))
    chosen = set(np.random.default_rng([seed, 7]).permutation(n)[:n_val].tolist())
    train = [c for i, c in enumerate(kept) if i not in chosen]
    val = [c for i, c in enumerate(kept) if i in chosen]
    tok = fmt.tokenizer
    pad = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
    train_loader = PackedChatLoader(train, seq_len, batch_size, "train", seed, rank, world_size, pad)
    val_loader = PackedChatLoader(val, seq_len, batch_size, "val", seed, rank, world_size, pad) if val else None
    report.train, report.val = len(train), len(val)
    report.rows, report.fill = len(train_loader.rows(0)), train_loader.fill(0)
    return TrainData(tok, train_loader, val_loader, None, str(path)), report
