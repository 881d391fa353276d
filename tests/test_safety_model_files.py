"""Model files are written without losing anything: `convert` / `export` / save_model write only
their own files into an output directory, refuse one that holds other things, survive a full disk,
and bad inputs (corrupt weights, impossible output paths, wrong Python types) get one-line errors."""
import errno
import json

import pytest
import torch

import velocis
from velocis.cli import main
from velocis.errors import VelocisError
from velocis.interop.hf import export_hf, read_hf_tensors
from velocis.model_io import load_model_dir, save_model
from velocis.models import VelocisModel

CFG = velocis.ModelConfig(vocab_size=96, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VelocisModel(CFG).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    Tokenizer = pytest.importorskip("velocis.tokenizer").Tokenizer
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("abc abd 你好 " * 20, encoding="utf-8")
    return Tokenizer.train([d / "a.txt"], vocab_size=263, progress=False)


@pytest.fixture
def vdir(tmp_path, model):
    save_model(model, None, tmp_path / "v")
    return tmp_path / "v"


@pytest.fixture
def hfdir(tmp_path, model):
    export_hf(model, None, tmp_path / "hf")
    return tmp_path / "hf"


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli_error(capsys, argv):
    """Run the CLI, expect a user error; return its single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


# --- 1. nothing lost --------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["convert", "export"])
def test_refuses_a_directory_with_unrelated_files_and_keeps_them(tmp_path, capsys, vdir, hfdir, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "x.bin").write_bytes(b"123")
    before = _snapshot(out)
    src = ["--from-hf", str(hfdir)] if cmd == "convert" else ["--model", str(vdir)]
    err = _cli_error(capsys, [cmd, *src, "--output", str(out)])
    assert f"--output {out}" in err and "notes.txt" in err and "--overwrite" in err
    assert _snapshot(out) == before
    # --overwrite writes the model beside them and deletes nothing
    assert main([cmd, *src, "--output", str(out), "--overwrite"]) == 0
    assert str(out) in capsys.readouterr().out
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before and "model.safetensors" in after
    velocis.load(out, device="cpu")


@pytest.mark.parametrize("cmd", ["convert", "export"])
def test_refuses_a_training_run(tmp_path, capsys, model, vdir, hfdir, cmd):
    run = tmp_path / "run"
    save_model(model, None, run)  # the latest model at the run's root ...
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # ... beside its metrics and checkpoints
    save_model(model, None, run / "checkpoints" / "step_1")
    (run / "checkpoints" / "step_1" / "trainer_state.pt").write_bytes(b"state")
    before = _snapshot(run)
    src = ["--from-hf", str(hfdir)] if cmd == "convert" else ["--model", str(vdir)]
    assert "training run" in _cli_error(capsys, [cmd, *src, "--output", str(run)])
    assert _snapshot(run) == before


def test_refuses_a_model_of_another_kind(tmp_path, model, vdir, hfdir):
    with pytest.raises(VelocisError, match="Hugging Face model"):
        save_model(model, None, hfdir)  # a Velocis config.json would replace the HF one
    with pytest.raises(VelocisError, match="Velocis model"):
        export_hf(model, None, vdir)
    assert json.loads((hfdir / "config.json").read_text())["architectures"]
    assert json.loads((vdir / "config.json").read_text())["architecture"] == "velocis"


def test_rerun_into_own_output_is_fine(tmp_path, capsys, hfdir, model, tok):
    out = tmp_path / "v"
    for _ in range(2):  # the second run owns the first one's files
        assert main(["convert", "--from-hf", str(hfdir), "--output", str(out)]) == 0
        assert main(["export", "--model", str(out), "--output", str(tmp_path / "hf2")]) == 0
    velocis.load(tmp_path / "hf2", device="cpu")
    # a model saved without a tokenizer does not inherit the previous one's (stale files of our own go)
    save_model(model, tok, out)
    assert (out / "tokenizer.json").is_file()
    save_model(model, None, out)
    assert not (out / "tokenizer.json").exists() and velocis.load(out, device="cpu")[1] is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_output_is_the_input_or_the_current_directory(tmp_path, capsys, monkeypatch, vdir, hfdir):
    before = _snapshot(hfdir)
    for extra in ([], ["--overwrite"]):  # never, even with --overwrite: it would replace the input
        err = _cli_error(capsys, ["convert", "--from-hf", str(hfdir), "--output", str(hfdir), *extra])
        assert "is the input" in err
    assert _snapshot(hfdir) == before
    monkeypatch.chdir(hfdir)
    assert "is the input" in _cli_error(capsys, ["convert", "--from-hf", ".", "--output", "."])
    assert "is the input" in _cli_error(capsys, ["export", "--model", str(vdir), "--output", str(vdir)])
    monkeypatch.chdir(tmp_path)  # holds v/ and hf/: not an output directory
    err = _cli_error(capsys, ["convert", "--from-hf", str(hfdir), "--output", "."])
    assert "--output ." in err and "--overwrite" in err
    assert _snapshot(hfdir) == before


# --- 2. clear errors ----------------------------------------------------------------------------
def test_truncated_weights_are_clear(tmp_path, capsys, vdir, hfdir):
    for d in (vdir, hfdir):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(VelocisError, match=r"model.safetensors is truncated or corrupt .*re-save or re-download"):
        velocis.load(vdir, device="cpu")
    with pytest.raises(VelocisError, match="truncated or corrupt"):
        load_model_dir(vdir)
    with pytest.raises(VelocisError, match="truncated or corrupt"):
        read_hf_tensors(hfdir)
    assert "truncated or corrupt" in _cli_error(capsys, ["export", "--model", str(vdir), "--output",
                                                          str(tmp_path / "o1")])
    assert "truncated or corrupt" in _cli_error(capsys, ["convert", "--from-hf", str(hfdir), "--output",
                                                          str(tmp_path / "o2")])
    (hfdir / "model.safetensors").write_bytes(b"")  # empty
    with pytest.raises(VelocisError, match="truncated or corrupt"):
        velocis.load(hfdir, device="cpu")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("writer", ["save_model", "export_hf"])
def test_full_disk_is_clear_and_keeps_previous_files(tmp_path, monkeypatch, model, tok, writer):
    import safetensors.torch

    write = (lambda d: save_model(model, tok, d)) if writer == "save_model" else (lambda d: export_hf(model, tok, d))
    out = tmp_path / "out"
    write(out)
    before = _snapshot(out)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(VelocisError, match=r"no space left .*needs about .*free"):
        write(out)
    assert _snapshot(out) == before  # nothing replaced, no temporaries left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_impossible_outputs_fail_before_any_work(tmp_path, capsys, monkeypatch, vdir, hfdir):
    import velocis.interop.hf as hf
    import velocis.model_io as model_io

    def no_work(*a, **k):
        raise AssertionError("loaded the model before checking --output")

    monkeypatch.setattr(hf, "load_hf", no_work)
    monkeypatch.setattr(model_io, "load_model_dir", no_work)
    (tmp_path / "file.txt").write_text("x")
    for out, why in [(tmp_path / "file.txt", "is a file"), (tmp_path / "file.txt" / "sub", "is a file"),
                     ("/proc/velocis-out", "not writable"), ("/sys/velocis-out", "not writable")]:
        assert why in _cli_error(capsys, ["convert", "--from-hf", str(hfdir), "--output", str(out)])
        assert why in _cli_error(capsys, ["export", "--model", str(vdir), "--output", str(out)])
    assert (tmp_path / "file.txt").read_text() == "x"


def test_python_api_wrong_types_name_the_parameter(model, vdir):
    for bad in (None, 3.5):
        with pytest.raises(VelocisError, match="out_dir"):
            save_model(model, None, bad)
        with pytest.raises(VelocisError, match="out_dir"):
            export_hf(model, None, bad)
        with pytest.raises(VelocisError, match="path"):
            load_model_dir(bad)
        with pytest.raises(VelocisError, match="path"):
            read_hf_tensors(bad)
    with pytest.raises(VelocisError, match="model"):
        save_model(None, None, vdir)
    with pytest.raises(VelocisError, match="dtype"):
        save_model(model, None, vdir, dtype="bfloat16")
    with pytest.raises(VelocisError, match="dtype"):
        export_hf(model, None, vdir.parent / "h", dtype=16)
