"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) for Chinese and English text.

Every string round-trips exactly: no normalizer, no prefix space, a byte-level alphabet of
all 256 bytes, and a byte-level decoder (HF's "cleanup of tokenization spaces" is turned off
in tokenizer_config.json). Pre-tokenization follows the GPT-4 / Llama-3 / Qwen2 regex with two
changes: digits are split one by one (arithmetic learns better), and runs of Han characters are
kept apart from Latin letters so that "用Python编程" becomes 用 / Python / 编程.

    tok = Tokenizer.train(["zh.txt", "en.txt"], vocab_size=8192)
    tok.save("tok/")                       # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    tok = Tokenizer.load("tok/")           # also loads Hugging Face Llama / Qwen tokenizer.json files
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from velocis.errors import VelocisError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens

# Velocis' chat format over the role tokens (rendered by serve/chat_template.py, saved as
# tokenizer_config.json's "chat_template" so transformers' apply_chat_template gives the same tokens).
# One expression per turn, so trim_blocks/lstrip_blocks cannot eat the newlines that belong to it.
# "developer" is OpenAI's newer name for the system role.
VELOCIS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('this model knows the roles system, user and assistant, not ' + role) -}}"
    "{%- endif -%}"
    "{{- '<|' + role + '|>\\n' + (message['content'] or '') + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    r"|[^\r\n\p{L}\p{N}]?(?:\p{Han}+|[\p{L}&&[^\p{Han}]]+)"  # a word (Han runs apart from other letters)
    r"|\p{N}"  # one digit at a time
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation and symbols
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # newlines, then other whitespace
)

# Names other tokenizers use for the same roles, tried when loading a foreign tokenizer.json.
_BOS_NAMES = [BOS, "<s>", "<bos>", "<|startoftext|>", "<｜begin▁of▁sentence｜>"]
_EOS_NAMES = [EOS, "</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<｜end▁of▁sentence｜>", "<|eot_id|>"]
_PAD_NAMES = [PAD, "<pad>", "<|finetune_right_pad_id|>", "<｜▁pad▁｜>"]


def _build_empty():
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` with Velocis' special tokens."""

    def __init__(self, hf_tokenizer, config: dict | None = None):
        self._tok = hf_tokenizer
        config = config or {}
        self.bos_id = self._find(config.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._find(config.get("eos_token"), _EOS_NAMES)
        self.pad_id = self._find(config.get("pad_token"), _PAD_NAMES)
        # a loaded model's own chat template (imported models keep theirs through a save)
        self.chat_template = config.get("chat_template") or None

    def _find(self, configured, names: list[str]) -> int | None:
        if isinstance(configured, dict):  # {"content": "<s>", ...} in tokenizer_config.json
            configured = configured.get("content")
        for name in ([configured] if configured else []) + names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    # -- training ------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        files: Iterable[str | Path],
        vocab_size: int,
        min_frequency: int = 2,
        progress: bool = True,
        max_bytes_per_file: int | None = None,
        on_invalid_utf8: str = "error",
        encoding: str = "utf-8",
    ) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary from .txt / .jsonl / .parquet files (or dirs/globs).

        max_bytes_per_file: read at most this much text of each file (cutting inside a document
        if need be). Documents reach the trainer in pieces of at most 64 KB (see data.sources), so
        memory stays bounded however long a document is. Warns when the text supports fewer
        tokens than `vocab_size`.
        """
        from tokenizers import pre_tokenizers, trainers

        from velocis.data.sources import check_read_options, expand_paths, iter_pieces

        if vocab_size < MIN_VOCAB_SIZE:
            raise VelocisError(
                f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        if max_bytes_per_file is not None and max_bytes_per_file <= 0:
            raise VelocisError(f"max_bytes_per_file / --sample-mb must be positive, not {max_bytes_per_file}")
        encoding = check_read_options(on_invalid_utf8, encoding)
        paths = expand_paths([str(f) for f in files], "--input")
        if not paths:
            raise VelocisError("no input files: pass --input FILE [FILE ...]")

        def texts() -> Iterator[str]:
            for path in paths:
                for piece, _ in iter_pieces(path, on_invalid_utf8, encoding, max_bytes=max_bytes_per_file):
                    yield piece

        tok = _build_empty()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            show_progress=progress,
        )
        tok.train_from_iterator(texts(), trainer=trainer)
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:  # BPE stops when no pair of tokens is left that occurs min_frequency times
            warnings.warn(f"the text only supports {got} tokens, not the {vocab_size} asked for: no pair of tokens is "
                          f"left that occurs min_frequency={min_frequency} times; give more text or a smaller "
                          f"vocab_size / --vocab-size", UserWarning, stacklevel=2)
        return cls(tok)

    # -- files ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a dir holding tokenizer.json, or the file itself.

        A prepared data dir (it holds index.json) is checked: its tokenizer must be the one its
        token shards were made with (`velocis.data.check_tokenizer_matches`).
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise VelocisError(f"{path}: no tokenizer.json here; train one with `velocis tokenizer train`")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise VelocisError(f"{file}: not a valid tokenizer.json ({e})") from None
        config = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                config = {}
        jinja_file = file.parent / "chat_template.jinja"  # where newer transformers saves the template
        if not config.get("chat_template") and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        tok = cls(hf, config)
        if path.is_dir() and (path / "index.json").is_file():
            check_tokenizer_matches(path, tok)
        return tok

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json + the two small files `transformers.AutoTokenizer` looks for."""
        from velocis.utils.atomic import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self._tok.to_str(pretty=True))
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        special = {k: self._tok.id_to_token(i) for k, i in names.items() if i is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # would eat spaces before punctuation on decode
            "model_max_length": 1_000_000_000,
        }
        chat = [t for t in (SYSTEM, USER, ASSISTANT, END) if self._tok.token_to_id(t) is not None]
        if chat:
            config["additional_special_tokens"] = special["additional_special_tokens"] = chat
        template = self.chat_template or (VELOCIS_TEMPLATE if len(chat) == 4 else None)
        if template:
            config["chat_template"] = template
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        return out

    # -- use -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encode(texts, add_special_tokens=False)]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise VelocisError("this tokenizer has no beginning-of-text token; encode without add_bos")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise VelocisError("this tokenizer has no end-of-text token; encode without add_eos")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def hash(self) -> str:
        """sha256 of the canonical JSON: the same vocabulary, merges and settings give the same hash."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


# --- a prepared data dir was tokenized by one tokenizer: check it wherever data is loaded ---------
def tokenizer_file_hash(tokenizer_file: Path) -> str | None:
    """Tokenizer.hash() of a tokenizer.json file; None when it is not a valid one."""
    try:
        return Tokenizer.load(tokenizer_file).hash()  # the file, not its dir: no index check
    except VelocisError:
        return None


_copy_hashes: dict[tuple, str | None] = {}  # (path, size, mtime) -> hash: PackedLoaders load the copy once


def check_tokenizer_matches(data_dir: str | Path, tokenizer=None) -> None:
    """Raise VelocisError unless `tokenizer` is the one `data_dir`'s token shards were made with.

    tokenizer: a velocis Tokenizer; None checks the data dir's own copy (tokenizer.json).
    A dir whose index.json records no tokenizer hash passes.
    """
    data_dir = Path(data_dir)
    try:
        expected = json.loads((data_dir / "index.json").read_text(encoding="utf-8")).get("tokenizer_hash")
    except (OSError, ValueError, AttributeError):
        expected = None
    if not expected:
        return
    if tokenizer is not None:
        actual = tokenizer.hash()
    else:
        copy = data_dir / "tokenizer.json"
        try:
            st = copy.stat()
        except FileNotFoundError:
            return
        key = (str(copy.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _copy_hashes:
            _copy_hashes[key] = tokenizer_file_hash(copy)
        actual = _copy_hashes[key]
    if actual != expected:
        which = "this tokenizer" if tokenizer is not None else f"its tokenizer.json (replaced since)"
        raise VelocisError(
            f"{data_dir}: its token shards were made with tokenizer {expected[:12]}, not with {which} "
            f"({(actual or 'invalid')[:12]}); use the tokenizer they were made with, or prepare the data again "
            f"(velocis data prepare --tokenizer DIR --output {data_dir} --overwrite)"
        )
