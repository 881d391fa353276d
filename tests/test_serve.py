"""`velocis serve` with the official openai client: completions and chat (streaming and not), stop,
max_tokens, n, logprobs, usage, bad requests (status and OpenAI error body, and the server still
answers), API keys, a client leaving mid-stream frees its KV blocks, greedy output equals
velocis.generate and the engine alone, chat templates as transformers renders them, and a clean
exit on SIGINT / SIGTERM. A tiny random-weight model and a small tokenizer; servers in-process on a
free loopback port."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import velocis
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.engine import Engine
from velocis.infer.sampling import SamplingParams
from velocis.model_io import save_model
from velocis.models import VelocisModel
from velocis.serve.model import ServedModel
from velocis.serve.server import ServerThread, build_app, free_port
from velocis.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 192
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "big", "red", "sun", "moon", "tree",
         "从前", "有座", "山", "里", "庙", "和尚"]


def make_model_dir(root, name="tiny", chat_template=None):
    """A random-weight model + a tokenizer trained on generated text, saved as a Velocis model dir."""
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(150)), encoding="utf-8")
    tok = Tokenizer.train([str(text)], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=64, max_seq_len=CONTEXT, init_std=0.3, prompt_start_token_id=tok.eos_id)
    out = save_model(VelocisModel(cfg), tok, root / name)
    if chat_template is not None:
        config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(model_dir):
    return ServedModel.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(served):
    app = build_app(served, max_num_seqs=8, kv_cache_memory=4_000_000)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(velocis_\w+)\{[^}]*\} (\S+)$", text, re.M)}


def still_answers(client):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


GREEDY = dict(temperature=0, max_tokens=16)


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_tokenize_detokenize(server, client, served):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/tokenize", json={"prompt": "the cat sat"}).json()
    assert r["tokens"] == served.prompt_ids("the cat sat") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert back["prompt"] == "the cat sat"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert served.tokenizer.decode(chat["tokens"]).endswith("<|user|>\nhi<|end|>\n<|assistant|>\n")


def test_greedy_completion_equals_generate_and_the_engine_alone(client, served):
    prompts = ["the cat sat on", "从前有座山", "a big red"]
    for p in prompts:
        ref = velocis.generate(served.model, served.tokenizer, p, max_new_tokens=16, temperature=0, top_k=None)
        r = client.completions.create(model="tiny", prompt=p, **GREEDY)
        assert r.choices[0].text == ref
        stream = client.completions.create(model="tiny", prompt=p, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in stream) == ref
    alone = Engine(served.model, served.tokenizer, max_num_seqs=1).generate(prompts, SamplingParams(**GREEDY))
    # the same prompts sent at once (batched in the server's engine) give the same texts
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], **GREEDY).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [a["text"] for a in alone]


def test_chat_streaming_and_not_agree_with_usage(client, served):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    ids = served.prompt_ids(served.chat_prompt(msgs))
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    # the engine alone on the rendered prompt, stopping at <|end|> as the server does
    end = served.tokenizer.token_to_id("<|end|>")
    alone = Engine(served.model, served.tokenizer, max_num_seqs=1).generate(
        [ids], SamplingParams(**GREEDY, stop_token_ids=[end]))[0]
    assert alone["text"] == text


def test_max_tokens_stop_and_usage(client):
    full = client.completions.create(model="tiny", prompt="the dog", temperature=0, max_tokens=24,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text[6:8]
    cut = client.completions.create(model="tiny", prompt="the dog", temperature=0, max_tokens=24, stop=[stop, "qqq"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="the dog", temperature=0, max_tokens=24, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    short = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_n_seed_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="a red", n=2, temperature=1.0, seed=7, max_tokens=8,
                                  logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 16
    assert r.choices[0].text != r.choices[1].text  # seed + i per sample
    again = client.completions.create(model="tiny", prompt="a red", n=2, temperature=1.0, seed=7, max_tokens=8,
                                      logprobs=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model="tiny", prompt="a red", n=2, temperature=1.0, seed=7, max_tokens=8,
                                            stream=True, extra_body={"ignore_eos": True}))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == r.choices[i].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                          max_tokens=5, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    assert all(bytes(t.bytes) for t in content)


# ---------------------------------------------------------------------------------------------- errors
LONG = " ".join(["the cat sat on the mat"] * 80)
BAD = [
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens"),
    ("string max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": "8"}, 400, "max_tokens"),
    ("temperature", "/v1/completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("negative temperature", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "temperature": -1}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p > 1", "/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("prompt over the context", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("messages over the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("token ids outside the vocabulary", "/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("invalid response_format", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "nope"}}, 400, "response_format"),
    ("response_format not an object", "/v1/completions", {"prompt": "a", "response_format": "json"}, 400,
     "response_format"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages"),
    ("stream_options without stream", "/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("n = 0", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("stop not strings", "/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("unknown model (chat)", "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "a"}]},
     404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, name, path, body, status, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    still_answers(client)


def test_malformed_json_body_size_unknown_route_and_the_client_exceptions(server, client):
    for raw in (b"{bad", b"[1, 2]", b"", "{\"prompt\": \"\xff\"".encode("latin-1")):
        r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    big = b'{"prompt": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="a", temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    still_answers(client)
    m = metrics(server)
    assert m["velocis_engine_alive"] == 1 and m["velocis_kv_cache_blocks_used"] == 0


def test_response_format_is_checked_and_applied(client):
    pytest.importorskip("llguidance")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                               "schema": 5}})
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], temperature=0,
                                       max_tokens=12, response_format={"type": "regex", "regex": "[0-9]{3}"})
    assert re.fullmatch(r"[0-9]{3}", r.choices[0].message.content), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    # logprobs of tokens the format forbids are -inf: clamped, so the body stays JSON
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], temperature=0,
                                       max_tokens=4, logprobs=True, top_logprobs=20,
                                       response_format={"type": "regex", "regex": "[0-9]{3}"})
    tops = [t.logprob for c in r.choices[0].logprobs.content for t in c.top_logprobs]
    assert min(tops) == -9999.0 and len(tops) == 20 * len(r.choices[0].logprobs.content)


def test_api_key(served):
    app = build_app(served, api_key="sekret", max_num_seqs=2, kv_cache_memory=1_000_000)
    with ServerThread(app) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key


def test_a_client_leaving_mid_stream_frees_its_blocks(server, client, monkeypatch):
    engine = server.app.state.engine_loop.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.005) or step())  # >= 0.9 s for the whole reply
    before = metrics(server)
    stream = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=CONTEXT - 8, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    during = metrics(server)
    assert during["velocis_kv_cache_blocks_used"] > 0 and during["velocis_num_requests_running"] == 1
    stream.close()  # the client goes away
    deadline = time.monotonic() + 10
    while (m := metrics(server))["velocis_kv_cache_blocks_used"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["velocis_kv_cache_blocks_used"] == 0 and m["velocis_num_requests_running"] == 0
    assert m["velocis_requests_aborted_total"] == before.get("velocis_requests_aborted_total", 0) + 1
    assert m["velocis_generation_tokens_total"] < before["velocis_generation_tokens_total"] + CONTEXT - 12
    # a non-streaming client that gives up (a timeout closes its connection) is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": CONTEXT - 8,
                                                         "ignore_eos": True}, timeout=0.3)
    deadline = time.monotonic() + 10
    while (m2 := metrics(server))["velocis_requests_aborted_total"] < m["velocis_requests_aborted_total"] + 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m2["velocis_requests_aborted_total"] == m["velocis_requests_aborted_total"] + 1
    assert m2["velocis_kv_cache_blocks_used"] == 0
    still_answers(client)


def test_metrics_names(server, client):
    still_answers(client)
    text = httpx.get(server.url + "/metrics").text
    for name in ("velocis_num_requests_running", "velocis_num_requests_waiting", "velocis_kv_cache_blocks_used",
                 "velocis_kv_cache_blocks_free", "velocis_prefix_cache_hit_rate", "velocis_generation_tokens_total",
                 "velocis_prompt_tokens_total", "velocis_time_to_first_token_seconds_bucket",
                 "velocis_e2e_request_latency_seconds_bucket", "velocis_generation_throughput_tokens_per_second"):
        assert name in text


# ---------------------------------------------------------------------------------------------- templates
CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_models_own_chat_template_renders_as_transformers_does(tmp_path, served):
    from transformers import PreTrainedTokenizerFast

    from velocis.serve.chat_template import find_chat_template

    d = make_model_dir(tmp_path, chat_template=CHATML)
    tpl = find_chat_template(d, Tokenizer.load(d))
    hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello 你好"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    for gen in (True, False):
        assert tpl.render(msgs, gen) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(velocis.VelocisError, match="no tools"):
        tpl.render([{"role": "tool", "content": "x"}])
    # the server uses it
    own = ServedModel.load(d, device="cpu")
    assert own.chat_prompt(msgs[:2]).startswith("<|begin_of_text|><|im_start|>system\nsys<|im_end|>")
    # Velocis' own template (no chat_template in the dir): role tokens, <|end|> stops a turn
    assert served.chat.builtin and served.chat.stop_token_ids == [served.tokenizer.token_to_id("<|end|>")]
    assert served.chat_prompt(msgs[:2]) == "<|system|>\nsys<|end|>\n<|user|>\nhello 你好<|end|>\n<|assistant|>\n"


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_velocis_serve_exits_cleanly_on_a_signal(model_dir, sig):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "velocis", "serve", "--model", str(model_dir), "--port", str(port),
                             "--device", "cpu", "--kv-cache-memory", "2MB", "--log-level", "warning",
                             "--shutdown-timeout", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        body = {"prompt": "a", "max_tokens": CONTEXT - 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(sig)  # stop accepting; the running stream is aborted (no drain time) yet ends properly
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("abort", "length")
        assert proc.wait(30) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_served_dtype_is_the_one_asked_for(model_dir):
    """--dtype: a bf16 server computes in bf16 (load's default on a CPU is fp32); a bad name is one line."""
    assert ServedModel.load(model_dir, device="cpu").model.dtype == torch.float32
    bf16 = ServedModel.load(model_dir, device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    from velocis.serve.server import build_engine

    out = build_engine(bf16, max_num_seqs=2, kv_cache_memory=2**24).generate(
        ["hello world", "the"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o["token_ids"]) for o in out] == [4, 4]
    with pytest.raises(VelocisError, match="dtype"):
        ServedModel.load(model_dir, device="cpu", dtype="int8")
