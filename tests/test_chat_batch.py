"""`velocis chat` (piped stdin: history, /reset, /exit) and `velocis batch` (OpenAI batch files: good and
bad lines, every line answered, resume after a partial run), in-process on a tiny random model."""
import io
import json

import pytest

from velocis.cli import main
from velocis.infer.engine import Engine
from velocis.infer.sampling import SamplingParams
from velocis.serve.model import ServedModel

from test_serve import make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat_batch"))


@pytest.fixture(scope="module")
def served(model_dir):
    return ServedModel.load(model_dir, device="cpu")


def reply(served, history, max_tokens=8):
    """What the engine alone answers to a conversation (greedy, stopping at <|end|>)."""
    ids = served.prompt_ids(served.chat_prompt(history))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=served.chat.stop_token_ids)
    return Engine(served.model, served.tokenizer, max_num_seqs=1).generate([ids], params)[0]["text"]


def test_chat_keeps_history_and_reset_clears_it(model_dir, served, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n\nand the dog?\n/reset\nthe cat\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "8", "--device", "cpu",
                 "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    sys_msg = [{"role": "system", "content": "be brief"}]
    r1 = reply(served, sys_msg + [{"role": "user", "content": "the cat"}])
    r2 = reply(served, sys_msg + [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": r1},
                                  {"role": "user", "content": "and the dog?"}])
    # after /reset the same question gets the first answer again: the history is gone
    assert out == f"{r1}\n{r2}\n[conversation cleared]\n{r1}\n"


def test_chat_refuses_bad_flags_before_loading(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def line(cid, url, body, **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


LONG = " ".join(["the cat sat on the mat"] * 80)
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def requests_file(path):
    lines = [
        line("c1", CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "the cat"}],
                          "temperature": 0, "max_tokens": 6}),
        line("p1", COMP, {"prompt": "a big red", "temperature": 0, "max_tokens": 5}),
        "{not json",
        line("bad-temp", COMP, {"prompt": "a", "temperature": 9}),
        line("too-long", COMP, {"prompt": LONG}),
        json.dumps({"method": "POST", "url": COMP, "body": {"prompt": "a"}}),  # no custom_id
        line("bad-url", "/v1/embeddings", {"input": "a"}),
        line("p1", COMP, {"prompt": "dup"}),  # a duplicate custom_id
        line("p2", COMP, {"prompt": "the sun", "temperature": 0, "max_tokens": 4, "n": 2}),
        line("c2", CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def batch(model_dir, inp, out):
    return main(["batch", "--model", str(model_dir), "--input", str(inp), "--output", str(out), "--device", "cpu",
                 "--kv-cache-memory", "4MB"])


def test_batch_answers_every_line_and_bad_lines_do_not_stop_the_rest(model_dir, served, tmp_path, capsys):
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    n = requests_file(inp)
    assert batch(model_dir, inp, out) == 0
    results = read(out)
    assert len(results) == n
    by_id = {r["custom_id"]: r for r in results if r["custom_id"]}
    ok = {k: by_id[k]["response"]["body"] for k in ("c1", "p1", "p2", "c2")}
    assert all(by_id[k]["response"]["status_code"] == 200 and by_id[k]["error"] is None for k in ok)
    assert ok["c1"]["choices"][0]["message"]["content"] == reply(served, [{"role": "user", "content": "the cat"}], 6)
    alone = Engine(served.model, served.tokenizer, max_num_seqs=1).generate(
        ["a big red"], SamplingParams(temperature=0, max_tokens=5))[0]["text"]
    assert ok["p1"]["choices"][0]["text"] == alone
    assert len(ok["p2"]["choices"]) == 2
    assert by_id["bad-temp"]["response"]["status_code"] == 400 and "temperature" in by_id["bad-temp"]["error"]["message"]
    assert by_id["too-long"]["response"]["status_code"] == 400
    assert by_id["too-long"]["error"]["code"] == "context_length_exceeded"
    assert by_id["bad-url"]["response"] is None and by_id["bad-url"]["error"]["code"] == "invalid_url"
    anonymous = sorted((r["error"]["code"], r["error"]["line"]) for r in results if r["custom_id"] is None)
    assert anonymous == [("duplicate_custom_id", 8), ("invalid_json", 3), ("invalid_request", 6)]
    assert all(r["id"].startswith("batch_req_") for r in results)
    assert "4 succeeded, 6 failed" in capsys.readouterr().err


def test_batch_resumes_after_a_partial_run(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    n = requests_file(inp)
    assert batch(model_dir, inp, out) == 0
    full = read(out)
    # a run killed after three results, in the middle of writing a fourth
    kept = full[:3]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "batch_req_x", "custo', encoding="utf-8")
    capsys.readouterr()
    assert batch(model_dir, inp, out) == 0
    resumed = read(out)
    assert resumed[:3] == kept  # finished results are kept as they were
    assert len(resumed) == n  # the partial line is gone, nothing is answered twice
    key = [(r["custom_id"], r["error"] and r["error"].get("line")) for r in resumed]
    assert len(set(key)) == n
    assert f"3 already done (of {n})" in capsys.readouterr().err
    assert batch(model_dir, inp, out) == 0  # a third run has nothing left to do
    assert len(read(out)) == n
    assert f"0 succeeded, 0 failed, {n} already done" in capsys.readouterr().err
