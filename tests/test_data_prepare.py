"""`data prepare`: token counts, formats, mix, validation split, resume, bad input (CLI)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from velocis.cli import main
from velocis.data import iter_documents, prepare_dataset
from velocis.data.default_corpus import write_default_corpus
from velocis.data.prepare import is_validation, token_dtype
from velocis.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Chinese as .txt + .jsonl, English as .txt + .parquet in a directory, and a tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("prep")
    zh, en = write_default_corpus(root / "corpus", documents=1500)
    (root / "zh").mkdir()
    zh.rename(root / "zh" / "stories.txt")
    with open(root / "zh" / "extra.jsonl", "w", encoding="utf-8") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"第{i}条记录：混合 English 和中文 😀\r\n第二行\t制表符", "id": i},
                               ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": "a literal <|end_of_text|> and <|user|> stay text"}) + "\n")
    (root / "en").mkdir()
    en.rename(root / "en" / "stories.txt")
    pq.write_table(pa.table({"text": [f"Parquet row {i}:  two  spaces,\ttab." for i in range(400)] + [None, ""]}),
                   root / "en" / "rows.parquet")
    tok = Tokenizer.train([root / "zh", root / "en"], vocab_size=700, progress=False)
    tok.save(root / "tok")
    return root


def prep(corpus: Path, out: Path, **kw) -> Path:
    kw.setdefault("num_workers", 1)
    kw.setdefault("shard_mb", 0.25)  # several shards per language, even for small text
    return prepare_dataset([str(corpus / "zh")], [str(corpus / "en" / "*")], corpus / "tok", out, **kw)


def read_index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text(encoding="utf-8"))


def all_documents(corpus: Path) -> list[str]:
    files = sorted((corpus / "zh").iterdir()) + sorted((corpus / "en").iterdir())
    return [d for f in files for d in iter_documents(f)]


def shard_tokens(out: Path, split: str) -> np.ndarray:
    index = read_index(out)
    dtype = np.dtype(index["dtype"])
    return np.concatenate([np.fromfile(out / s["path"], dtype=dtype) for s in index["splits"][split]["shards"]])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    return prep(corpus, tmp_path_factory.mktemp("out") / "data", num_workers=2)


def test_tokens_equal_documents_encoded_one_by_one(corpus, prepared):
    tok = Tokenizer.load(corpus / "tok")
    tok.backend.encode_special_tokens = True  # documents are plain text, as in prepare
    docs = all_documents(corpus)
    expected = sum(len(tok.encode(d)) + 1 for d in docs)
    index = read_index(prepared)
    assert index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"] == expected
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == len(docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert index["splits"]["train"]["utf8_bytes"] + index["splits"]["val"]["utf8_bytes"] == nbytes
    assert index["dtype"] == "uint16" and index["tokenizer_hash"] == tok.hash()
    assert len(index["splits"]["train"]["shards"]) >= 4  # shards really were cut
    assert Tokenizer.load(prepared).hash() == tok.hash()  # the copy travels with the data
    # the shards hold exactly the documents, each followed by end-of-text, in input order
    val_docs = [d for d in docs if is_validation(d.encode("utf-8"), 0.01)]
    train_docs = [d for d in docs if not is_validation(d.encode("utf-8"), 0.01)]
    assert 0 < len(val_docs) < len(docs) / 20
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        stream = shard_tokens(prepared, split)
        want = [t for d in split_docs for t in tok.encode(d, add_eos=True)]
        assert stream.tolist() == want
        assert tok.decode(stream[: len(tok.encode(split_docs[0])) ].tolist()) == split_docs[0]


def test_one_worker_and_many_give_identical_shards(corpus, prepared, tmp_path):
    single = prep(corpus, tmp_path / "single", num_workers=1)
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(single, split), shard_tokens(prepared, split))
    a, b = read_index(single), read_index(prepared)
    assert a["splits"] == b["splits"]


def test_docs_table(prepared):
    index = read_index(prepared)
    for s in index["splits"]["train"]["shards"]:
        table = np.load(prepared / s["docs"])
        assert table.shape == (s["documents"], 3)
        assert table[:, 1].sum() == s["tokens"] and table[:, 2].sum() == s["utf8_bytes"]
        assert np.array_equal(table[1:, 0], np.cumsum(table[:, 1])[:-1])
        tokens = np.fromfile(prepared / s["path"], dtype=np.uint16)
        ends = table[:, 0] + table[:, 1] - 1
        assert (tokens[ends] == index["eos_id"]).all()
        assert (tokens == index["eos_id"]).sum() == s["documents"]  # no end-of-text from the text itself


@pytest.mark.parametrize("mix", [0.5, 0.2, 0.9])
def test_mix_is_fraction_of_chinese_tokens(corpus, tmp_path, mix):
    out = prep(corpus, tmp_path / "mixed", mix=mix)
    for split in ("train", "val"):
        info = read_index(out)["splits"][split]
        assert info["chinese_fraction"] == pytest.approx(mix, abs=0.02 if split == "train" else 0.1)
        assert info["tokens"] == sum(info["tokens_by_language"].values())


def test_rerun_of_finished_run_is_a_fast_noop(corpus, prepared):
    before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*")}
    t0 = time.perf_counter()
    prep(corpus, prepared, num_workers=2)
    assert time.perf_counter() - t0 < 2
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == before


def test_resume_rewrites_only_missing_shards(corpus, tmp_path):
    out = prep(corpus, tmp_path / "data")
    final = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a run killed part way: one shard never finished (marker and files missing); its index is the old one
    (key,) = [p.stem for p in (out / "done").glob("zh_00001-*.json")]  # names are key-contenthash
    (out / "done" / f"{key}.json").unlink()
    (out / "train" / f"{key}.bin").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    (out / "index.json").write_text("{}")  # an index that does not describe this input
    time.sleep(0.02)
    prep(corpus, out)
    rewritten = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                       and p in mtimes and p.stat().st_mtime_ns != mtimes[p])
    assert rewritten == ["index.json", f"train/{key}.docs.npy", f"val/{key}.bin", f"val/{key}.docs.npy"]
    again = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert again == final


def test_changed_input_rewrites_only_changed_shards_and_drops_stale(corpus, tmp_path):
    out = prep(corpus, tmp_path / "data")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    small = tmp_path / "zh_small"
    small.mkdir()
    (small / "a.txt").write_text("只有一个文档。\n", encoding="utf-8")
    prepare_dataset([str(small)], None, corpus / "tok", out, num_workers=1, shard_mb=0.25, val_fraction=0.0)
    index = read_index(out)
    (shard,) = index["splits"]["train"]["shards"]
    key = Path(shard["path"]).stem
    assert key.startswith("zh_00000-") and key not in {Path(n).stem for n in before}  # new text, new name
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{key}.bin", f"{key}.docs.npy"]
    assert sorted(p.name for p in (out / "done").iterdir()) == [f"{key}.json"]
    assert sorted(p.name for p in (out / "val").iterdir()) == [f"{key}.bin", f"{key}.docs.npy"]


def test_token_dtype():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32" and token_dtype(151_936) == "uint32"


def test_validation_split_is_deterministic_by_text():
    docs = [f"document {i}".encode() for i in range(20000)]
    picked = [is_validation(d, 0.05) for d in docs]
    assert picked == [is_validation(d, 0.05) for d in docs]
    assert 0.04 < sum(picked) / len(docs) < 0.06
    assert not any(is_validation(d, 0.0) for d in docs)


def test_cli_prepare_and_default_corpus(tmp_path, capsys):
    assert main(["data", "default-corpus", "--output", str(tmp_path / "c"), "--documents", "300"]) == 0
    zh, en = tmp_path / "c" / "zh.txt", tmp_path / "c" / "en.txt"
    assert zh.is_file() and en.is_file()
    Tokenizer.train([zh, en], vocab_size=400, progress=False).save(tmp_path / "tok")
    assert main(["data", "prepare", "--chinese-path", str(zh), "--english-path", str(en), "--tokenizer",
                 str(tmp_path / "tok"), "--output", str(tmp_path / "data"), "--mix", "0.5", "--quiet",
                 "--val-fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "Chinese" in out
    index = read_index(tmp_path / "data")
    assert index["settings"]["val_fraction"] == 0.05
    assert index["splits"]["train"]["chinese_fraction"] == pytest.approx(0.5, abs=0.02)


# --- bad input: one line on stderr, exit 2, nothing left behind ---------------------------------
def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def prepare_argv(corpus: Path, out: Path, zh=None, en=None, *extra) -> list[str]:
    argv = ["data", "prepare", "--tokenizer", str(corpus / "tok"), "--output", str(out), "--quiet", "--num-workers", "2"]
    if zh:
        argv += ["--chinese-path", *map(str, zh)]
    if en:
        argv += ["--english-path", *map(str, en)]
    return argv + list(extra)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_bad_missing_path(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_error(capsys, prepare_argv(corpus, out, zh=[tmp_path / "missing.txt"]))
    assert "--chinese-path" in err and "missing.txt" in err and "no such file" in err
    err = cli_error(capsys, prepare_argv(corpus, out, en=[tmp_path / "nothing*.jsonl"]))
    assert "--english-path" in err and "matches no files" in err
    err = cli_error(capsys, prepare_argv(corpus, out))
    assert "--chinese-path" in err and "--english-path" in err
    assert_nothing_written(out)


def test_bad_empty_file(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_bytes(b"")
    err = cli_error(capsys, prepare_argv(corpus, out, zh=[corpus / "zh"], en=[tmp_path / "empty.txt"]))
    assert "empty.txt" in err and "empty" in err
    (tmp_path / "blank.txt").write_bytes(b"\n \n\r\n")
    err = cli_error(capsys, prepare_argv(corpus, out, zh=[corpus / "zh"], en=[tmp_path / "blank.txt"]))
    assert "blank.txt" in err and "no text" in err
    assert_nothing_written(out)


def test_bad_utf8_reports_offset_and_can_be_replaced(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.txt"
    good = "第一个文档。\n\n第二个文档\n".encode("utf-8")
    bad.write_bytes(good + b"broken \xe4\xb8 here\n")
    err = cli_error(capsys, prepare_argv(corpus, out, zh=[corpus / "zh", bad], en=[corpus / "en"]))
    assert str(bad) in err and f"byte offset {len(good) + 7}" in err and "--on-invalid-utf8 replace" in err
    assert_nothing_written(out)
    assert main(prepare_argv(corpus, out, [bad], None, "--on-invalid-utf8", "replace", "--val-fraction", "0")) == 0
    tok = Tokenizer.load(out)
    assert "broken \ufffd here" in tok.decode(shard_tokens(out, "train").tolist())


def test_bad_jsonl_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")
    err = cli_error(capsys, prepare_argv(corpus, out, zh=[corpus / "zh"], en=[bad]))
    assert f"{bad}:4" in err and "JSON" in err
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    err = cli_error(capsys, prepare_argv(corpus, out, en=[bad]))
    assert f"{bad}:2" in err and '"text"' in err
    assert_nothing_written(out)


def test_bad_other_tokenizer_in_output(corpus, prepared, tmp_path, capsys):
    other = Tokenizer.train([corpus / "en"], vocab_size=300, progress=False)
    other.save(tmp_path / "other_tok")
    before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*")}
    argv = prepare_argv(corpus, prepared, zh=[corpus / "zh"])
    argv[argv.index("--tokenizer") + 1] = str(tmp_path / "other_tok")
    err = cli_error(capsys, argv)
    assert str(prepared) in err and "another tokenizer" in err
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == before  # untouched


def test_bad_input_after_some_shards_removes_them(corpus, tmp_path, capsys):
    # the bad line comes after shards were already written: they are removed again
    out = tmp_path / "out"
    bad = tmp_path / "late.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    err = cli_error(capsys, prepare_argv(corpus, out, [corpus / "zh"], [corpus / "en", bad], "--shard-mb", "0.05"))
    assert f"{bad}:2" in err
    assert_nothing_written(out)


def test_bad_vocab_and_options(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_error(capsys, prepare_argv(corpus, out, [corpus / "zh"], None, "--mix", "0.5"))
    assert "--mix" in err
    err = cli_error(capsys, prepare_argv(corpus, out, [corpus / "zh"], [corpus / "en"], "--mix", "1.5"))
    assert "--mix" in err
    argv = prepare_argv(corpus, out, [corpus / "zh"])
    argv[argv.index("--tokenizer") + 1] = str(tmp_path)
    err = cli_error(capsys, argv)
    assert "tokenizer.json" in err
    assert_nothing_written(out)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
def test_shared_data_token_count(tmp_path):
    zh, en = [SHARED / "zh"], [SHARED / "en"]
    tok = Tokenizer.train([SHARED / "zh", SHARED / "en"], vocab_size=8192, progress=False,
                          max_bytes_per_file=2_000_000)
    tok.save(tmp_path / "tok")
    out = prepare_dataset(zh, en, tmp_path / "tok", tmp_path / "data", num_workers=2, progress=False)
    tok.backend.encode_special_tokens = True  # documents are plain text, as in prepare
    index = read_index(out)
    total = 0
    ndocs = 0
    for f in sorted((SHARED / "zh").iterdir()) + sorted((SHARED / "en").iterdir()):
        docs = list(iter_documents(f))
        ndocs += len(docs)
        total += sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    assert index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"] == total
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == ndocs


def test_sigkill_then_rerun_gives_identical_output(corpus, prepared, tmp_path):
    """A real kill: the CLI is SIGKILLed once some shards are done; the re-run finishes the job."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "velocis", "data", "prepare", "--chinese-path", str(corpus / "zh"),
            "--english-path", str(corpus / "en" / "*"), "--tokenizer", str(corpus / "tok"), "--output", str(out),
            "--num-workers", "2", "--quiet"]
    proc = subprocess.Popen(argv + ["--shard-mb", "0.25"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((out / "done").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "index.json").exists():
        pytest.skip("the run finished before it could be killed")
    done_before = {p: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}
    assert done_before
    subprocess.run(argv + ["--shard-mb", "0.25"], check=True, stdout=subprocess.DEVNULL)
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # finished shards were kept
    reference = prep(corpus, tmp_path / "reference")
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "index.json"}
    assert files(out) == files(reference)
    a, b = read_index(out), read_index(reference)
    assert a["splits"] == b["splits"] and a["tokenizer_hash"] == b["tokenizer_hash"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries left
