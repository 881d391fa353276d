"""Data safety (issue "Nothing lost, nothing run"): a failed re-run keeps the previous dataset,
tokenizers and data stay consistent, workers die with their parent, memory stays bounded on huge
documents, and bad options or input get a one-line error."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from velocis.cli import main
from velocis.data.default_corpus import write_default_corpus
from velocis.errors import VelocisError
from velocis.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    zh, en = write_default_corpus(root, documents=600)
    Tokenizer.train([zh, en], vocab_size=500, progress=False).save(root / "tok")
    return root  # zh.txt, en.txt, tok/


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of `velocis ARGV` (argparse errors too)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    if code == 2:
        assert err.count("\n") == 0 and "Traceback" not in err, err
    return code, err


def prepare_argv(corpus: Path, out: Path, *extra: str, en: list | None = None) -> list[str]:
    en = en or [corpus / "en.txt"]
    return ["data", "prepare", "--chinese-path", str(corpus / "zh.txt"), "--english-path", *map(str, en),
            "--tokenizer", str(corpus / "tok"), "--output", str(out), "--quiet", *extra]


def contents(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def loaded(d: Path, splits=("train", "val")) -> dict[str, list[int]]:
    """What training would read: each split's whole token stream through PackedLoader."""
    from velocis.data import PackedLoader

    out = {}
    for split in splits:
        loader = PackedLoader(d, 8, 1, split=split)
        out[split] = loader.read_tokens(0, loader.num_tokens).tolist()
    return out


def text_of_size(corpus: Path, nbytes: int, newlines: bool = True) -> str:
    text = (corpus / "zh.txt").read_text(encoding="utf-8") + (corpus / "en.txt").read_text(encoding="utf-8")
    if not newlines:
        text = text.replace("\n", " ")
    data = (text * (nbytes // len(text.encode("utf-8")) + 1)).encode("utf-8")[:nbytes]
    return data.decode("utf-8", errors="ignore")  # nbytes of mixed zh/en, less a cut character


# --- 2. a failed re-run leaves the previous dataset as it was ------------------------------------
@pytest.mark.parametrize("bad", ["invalid_utf8", "bad_json_late", "missing"])
def test_failed_rerun_keeps_the_previous_dataset(corpus, tmp_path, capsys, bad):
    out = tmp_path / "data"
    assert run(capsys, prepare_argv(corpus, out, "--shard-mb", "0.05", "--num-workers", "2"))[0] == 0
    files, tokens = contents(out), loaded(out)
    good = "".join(f"An extra document number {i}, long enough to fill shards.\n\n" for i in range(3000))
    if bad == "invalid_utf8":
        extra = tmp_path / "extra.txt"
        extra.write_bytes(good.encode() + b"then a broken \xff byte\n")
    elif bad == "bad_json_late":
        extra = tmp_path / "extra.jsonl"
        extra.write_text("".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(3000)) + "{oops\n")
    else:
        extra = tmp_path / "missing.txt"
    # the extra file follows en.txt: en's last shard changes and new shards are written before the error
    code, err = run(capsys, prepare_argv(corpus, out, "--shard-mb", "0.05", "--num-workers", "2",
                                         en=[corpus / "en.txt", extra]))
    assert code == 2 and str(extra) in err
    assert contents(out) == files  # nothing replaced, nothing left behind
    assert loaded(out) == tokens


# --- 3. tokenizers and data stay consistent --------------------------------------------------------
def test_tokenizer_train_refuses_a_prepared_data_dir(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert run(capsys, prepare_argv(corpus, out, "--num-workers", "1"))[0] == 0
    files = contents(out)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, ["tokenizer", "train", "--input", str(corpus / "en.txt"), "--vocab-size", "300",
                                 "--output", str(out), "--quiet", *extra])
        assert code == 2 and str(out) in err and "prepared data" in err, err
    assert contents(out) == files
    loaded(out)


def test_tokenizer_train_replaces_another_tokenizer_only_with_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(corpus / "en.txt"), "--output", str(out), "--quiet", "--vocab-size"]
    assert run(capsys, argv + ["300"])[0] == 0
    first = contents(out)
    assert run(capsys, argv + ["300"])[0] == 0  # the same tokenizer again: nothing to protect
    assert contents(out) == first
    code, err = run(capsys, argv + ["320"])
    assert code == 2 and str(out) in err and "another tokenizer" in err and "--overwrite" in err, err
    assert contents(out) == first
    assert run(capsys, argv + ["320", "--overwrite"])[0] == 0
    assert Tokenizer.load(out).vocab_size == 320


def test_data_prepare_refuses_another_tokenizers_dir(corpus, tmp_path, capsys):
    other = tmp_path / "other_tok"
    Tokenizer.train([corpus / "en.txt"], vocab_size=300, progress=False).save(other)
    files = contents(other)
    code, err = run(capsys, prepare_argv(corpus, other, "--num-workers", "1"))
    assert code == 2 and str(other) in err and "another tokenizer" in err and "--overwrite" in err, err
    assert contents(other) == files
    assert run(capsys, prepare_argv(corpus, other, "--num-workers", "1", "--overwrite"))[0] == 0
    assert Tokenizer.load(other).hash() == Tokenizer.load(corpus / "tok").hash()
    loaded(other)


def test_tokenizer_hash_is_checked_where_data_is_loaded(corpus, tmp_path):
    from velocis.data import PackedLoader, check_tokenizer_matches, prepare_dataset

    out = prepare_dataset([corpus / "zh.txt"], [corpus / "en.txt"], corpus / "tok", tmp_path / "data", num_workers=1)
    check_tokenizer_matches(out, Tokenizer.load(corpus / "tok"))
    other = Tokenizer.train([corpus / "en.txt"], vocab_size=300, progress=False)
    with pytest.raises(VelocisError, match="tokenizer"):
        check_tokenizer_matches(out, other)
    other.save(out)  # what `velocis tokenizer train --output DATA_DIR` used to do
    with pytest.raises(VelocisError, match="tokenizer"):
        Tokenizer.load(out)
    with pytest.raises(VelocisError, match="tokenizer"):
        PackedLoader(out, 8, 1)
    Tokenizer.load(out / "tokenizer.json")  # the file itself, asked for by name, still loads


# --- 4. worker processes die with their parent -------------------------------------------------------
def test_workers_exit_when_data_prepare_is_killed(corpus, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(text_of_size(corpus, 16 * 2**20), encoding="utf-8")
    argv = [sys.executable, "-m", "velocis", "data", "prepare", "--english-path", str(big), "--tokenizer",
            str(corpus / "tok"), "--output", str(tmp_path / "out"), "--num-workers", "2", "--shard-mb", "1", "--quiet"]
    proc = psutil.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: dict[int, psutil.Process] = {}  # every child seen, so that the test can end them whatever happens

    def busy() -> int:
        n = 0
        try:
            now = proc.children(recursive=True)
        except psutil.Error:
            return n
        for c in now:
            children.setdefault(c.pid, c)
            try:
                n += c.cpu_times().user > 0.3
            except psutil.Error:
                pass
        return n

    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and busy() < 2:  # until both workers tokenize
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.skip("data prepare finished before it could be killed")
        assert len(children) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def alive() -> list[psutil.Process]:
            out = []
            for c in children.values():
                try:
                    if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c)
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.time() + 10
        while alive() and time.time() < deadline:
            time.sleep(0.1)
        left = [c.pid for c in alive()]
        assert not left, f"children still running after their parent was killed: {left}"
    finally:
        for c in [proc, *children.values()]:  # never leave our own processes behind, even when the test fails
            try:
                c.kill()
            except psutil.Error:
                pass


# --- 5. huge documents: bounded pieces, bounded memory ----------------------------------------------
SPLIT_CASES = {
    "lines": "a short line of English text\n" * 200,
    "zh_sentences": "这是一个没有换行的中文句子。真的吗？是的！" * 200,
    "en_sentences": "One sentence here. Another one! A question? " * 200,
    "no_boundary": "中" * 500 + "x" * 700 + "😀" * 300 + "é" * 400,
    "mixed": ("第一行。\n" + "长" * 900 + "。" + "句子" * 300 + "\r\n") * 5,
}


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
@pytest.mark.parametrize("max_bytes", [16, 101, 1000])
def test_split_text_pieces_rejoin_and_respect_the_limit(name, max_bytes):
    from velocis.data.sources import split_text

    text = SPLIT_CASES[name]
    pieces = split_text(text, max_bytes)
    assert "".join(pieces) == text
    assert all(0 < len(p.encode("utf-8")) <= max_bytes for p in pieces)
    if name == "lines" and max_bytes >= 101:  # cut at line ends
        assert all(p.endswith("\n") for p in pieces)
    if name == "zh_sentences" and max_bytes >= 101:  # cut after sentence ends
        assert all(p[-1] in "。？！" for p in pieces)
    if name == "en_sentences" and max_bytes >= 101:  # after the mark, before the space
        assert all(p[-1] in ".!?" for p in pieces[:-1])
    assert split_text("short", max_bytes) == ["short"]


def test_txt_pieces_stream_a_long_line_and_keep_documents(tmp_path):
    from velocis.data.sources import iter_documents, iter_pieces

    long_doc = "一句话。" * 5000 + "and English. " * 3000  # ~100 KB on one line
    docs = ["first document\nwith two lines", long_doc, "last\r\ndocument"]
    f = tmp_path / "a.txt"
    f.write_bytes("\n\n".join(docs).encode("utf-8") + b"\r\n")
    assert list(iter_documents(f)) == docs
    pieces = list(iter_pieces(f, max_piece_bytes=1000))
    assert all(len(p.encode("utf-8")) <= 1000 for p, _ in pieces)
    rebuilt, current = [], ""
    for piece, last in pieces:
        current += piece
        if last:
            rebuilt.append(current)
            current = ""
    assert rebuilt == docs and not current
    assert pieces[0] == (docs[0], True) and pieces[-1] == (docs[2], True)  # short documents stay whole
    capped = list(iter_pieces(f, max_bytes=50_000, max_piece_bytes=1000))
    assert 49_000 < sum(len(p.encode("utf-8")) for p, _ in capped) <= 50_000


def test_long_document_is_one_document_in_the_shards(corpus, tmp_path):
    from velocis.data import prepare_dataset

    long_doc = text_of_size(corpus, 1_000_000, newlines=False)  # 16 pieces of 64 KB, no newline
    docs = ["a short first document", long_doc, "a short last document"]
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = prepare_dataset(None, [f], corpus / "tok", tmp_path / "data", num_workers=2, val_fraction=0.0)
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["documents"] == 3
    tok = Tokenizer.load(out)
    stream = np.array(loaded(out, ["train"])["train"])
    ends = np.flatnonzero(stream == tok.eos_id)
    assert ends.tolist()[-1] == len(stream) - 1 and len(ends) == 3  # end-of-text only at document ends
    starts = [0, *(ends[:-1] + 1)]
    assert [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)] == docs


def test_sample_mb_caps_the_text_read_inside_one_document(tmp_path, capsys):
    f = tmp_path / "one_doc.txt"
    f.write_text("alpha beta gamma " * 70_000 + "omega zeta " * 70_000, encoding="utf-8")  # one 2 MB line
    tok = Tokenizer.train([f], vocab_size=300, progress=False, max_bytes_per_file=500_000)
    assert tok.token_to_id("Ġalpha") is not None and tok.token_to_id("Ġomega") is None
    assert main(["tokenizer", "train", "--input", str(f), "--vocab-size", "300", "--sample-mb", "0.5",
                 "--output", str(tmp_path / "tok"), "--quiet"]) == 0
    cli_tok = Tokenizer.load(tmp_path / "tok")
    assert cli_tok.token_to_id("Ġalpha") is not None and cli_tok.token_to_id("Ġomega") is None


def peak_tree_rss(argv: list[str]) -> tuple[int, int]:
    """(exit status, peak RSS of the process and its children), sampled every 20 ms."""
    proc = psutil.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.02)
    return proc.returncode, peak


@pytest.mark.slow
def test_peak_memory_stays_bounded_on_a_20mb_line(corpus, tmp_path):
    huge = tmp_path / "huge.txt"
    huge.write_text(text_of_size(corpus, 20 * 2**20, newlines=False), encoding="utf-8")
    cli = [sys.executable, "-m", "velocis"]
    code, peak = peak_tree_rss(cli + ["tokenizer", "train", "--input", str(huge), "--vocab-size", "2000",
                                      "--output", str(tmp_path / "tok"), "--quiet"])
    assert code == 0 and peak < 1.5 * 2**30, f"tokenizer train: peak RSS {peak / 2**20:.0f} MB"
    code, peak = peak_tree_rss(cli + ["data", "prepare", "--english-path", str(huge), "--tokenizer",
                                      str(tmp_path / "tok"), "--output", str(tmp_path / "data"),
                                      "--num-workers", "2", "--quiet"])
    assert code == 0 and peak < 1.5 * 2**30, f"data prepare: peak RSS {peak / 2**20:.0f} MB"


# --- 6. options and input errors ---------------------------------------------------------------------
def test_num_workers_must_be_positive(corpus, tmp_path, capsys):
    from velocis.data import prepare_dataset

    for n in ("-3", "0"):
        code, err = run(capsys, prepare_argv(corpus, tmp_path / "out", "--num-workers", n))
        assert code == 2 and "--num-workers" in err and n in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(VelocisError, match="num_workers"):
        prepare_dataset([corpus / "zh.txt"], None, corpus / "tok", tmp_path / "out", num_workers=-3)


def test_vocab_size_beyond_what_the_text_supports_is_reported(tmp_path, capsys):
    f = tmp_path / "small.txt"
    f.write_text("a little text, not enough for a big vocabulary.\n\nanother little document.\n")
    code = main(["tokenizer", "train", "--input", str(f), "--vocab-size", "100000", "--output", str(tmp_path / "t"),
                 "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    n = Tokenizer.load(tmp_path / "t").vocab_size
    assert n < 1000 and f"only supports {n} tokens" in captured.err and "100000" in captured.err, captured
    with pytest.warns(UserWarning, match=f"only supports {n} tokens"):
        Tokenizer.train([f], vocab_size=100000, progress=False)


def test_invalid_utf8_hint_names_the_python_option_too(corpus, tmp_path):
    from velocis.data import prepare_dataset
    from velocis.train.prepare import prepare_run_data

    bad = tmp_path / "bad.txt"
    bad.write_bytes("".join(f"第{i}个好的文档。\n\n" for i in range(50)).encode() + b"broken \xff byte\n")
    with pytest.raises(VelocisError) as e:
        prepare_dataset([bad], None, corpus / "tok", tmp_path / "out", num_workers=1)
    assert "on_invalid_utf8" in str(e.value) and "--on-invalid-utf8" in str(e.value)
    data = prepare_run_data(tmp_path / "run", [str(bad)], None, vocab_size=300, progress=False,
                            on_invalid_utf8="replace")
    assert (data / "index.json").is_file()
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("".join(f"第{i}个用GBK写的文档。\n\n" for i in range(50)).encode("gbk"))
    data = prepare_run_data(tmp_path / "run_gbk", [str(gbk)], None, vocab_size=300, progress=False,
                            encoding="gb18030")
    tok = Tokenizer.load(data)
    assert "个用GBK写的文档。" in tok.decode(loaded(data, ["train"])["train"][:50])


def test_gbk_text_is_detected_and_read_with_encoding(corpus, tmp_path, capsys):
    docs = (corpus / "zh.txt").read_text(encoding="utf-8").split("\n\n")[:200]
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n\n".join(docs).encode("gb18030"))
    out = tmp_path / "out"
    argv = ["data", "prepare", "--chinese-path", str(gbk), "--tokenizer", str(corpus / "tok"), "--output", str(out),
            "--quiet", "--num-workers", "1", "--val-fraction", "0"]
    for extra in ([], ["--on-invalid-utf8", "replace"]):
        code, err = run(capsys, argv + extra)
        assert code == 2 and str(gbk) in err and "--encoding gb18030" in err, err
    assert not out.exists()
    assert run(capsys, argv + ["--encoding", "gb18030"])[0] == 0
    tok = Tokenizer.load(out)
    assert tok.decode(loaded(out, ["train"])["train"]).split("<|end_of_text|>")[:-1] == [d.strip("\n") for d in docs]
    tok_argv = ["tokenizer", "train", "--input", str(gbk), "--vocab-size", "300", "--output", str(tmp_path / "t"),
                "--quiet"]
    code, err = run(capsys, tok_argv + ["--on-invalid-utf8", "replace"])
    assert code == 2 and "--encoding gb18030" in err, err
    assert run(capsys, tok_argv + ["--encoding", "gb18030"])[0] == 0
    code, err = run(capsys, tok_argv + ["--encoding", "no-such-codec"])
    assert code == 2 and "no-such-codec" in err and "--encoding" in err, err


def test_parquet_text_column_that_is_not_strings(corpus, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": list(range(100))}), bad)
    out = tmp_path / "out"
    code, err = run(capsys, prepare_argv(corpus, out, "--num-workers", "2", en=[corpus / "en.txt", bad]))
    assert code == 2 and str(bad) in err and '"text" column' in err and "int64" in err, err
    assert not out.exists()
    assert run(capsys, prepare_argv(corpus, out, "--num-workers", "1"))[0] == 0
    files = contents(out)
    code, err = run(capsys, prepare_argv(corpus, out, "--num-workers", "2", en=[corpus / "en.txt", bad]))
    assert code == 2 and '"text" column' in err
    assert contents(out) == files
    code, err = run(capsys, ["tokenizer", "train", "--input", str(bad), "--vocab-size", "300",
                             "--output", str(tmp_path / "t")])
    assert code == 2 and '"text" column' in err
