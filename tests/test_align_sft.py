"""SFT: chat-template rendering with an assistant-only mask (checked against transformers), packing
with positions reset per conversation, masking acceptance (another packed conversation or a later
prompt token leaves an assistant token's loss and gradient unchanged), the loss normalised over the
step's assistant tokens, bad input, and `velocis sft` end to end."""
import io
import json
import random
import shutil
import sys

import numpy as np
import pytest
import torch

from velocis.align.chat_data import (IGNORE_INDEX, ChatFormat, PackedChatLoader, chat_train_data, pack_rows,
                                     read_conversations, render_conversations)
from velocis.align.sft import SFTObjective
from velocis.cli import main
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.model_io import load_model_dir, save_model
from velocis.models import VelocisModel
from velocis.tokenizer import VELOCIS_TEMPLATE, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "big", "red", "sun", "plus", "is",
         "从前", "有座", "山", "里", "庙", "和尚"]


def make_model_dir(root, context=128):
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + f" {rng.randint(0, 999)}"
                                for _ in range(150)), encoding="utf-8")
    tok = Tokenizer.train([str(text)], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=64, max_seq_len=context, init_std=0.3, prompt_start_token_id=tok.eos_id)
    return save_model(VelocisModel(cfg), tok, root / "base")


def arithmetic(n, seed=0, multi_every=3):
    """Conversations `a + b =` -> `c`, every third one with a system turn and a second exchange."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        msgs = [{"role": "user", "content": f"{a} + {b} ="}, {"role": "assistant", "content": str(a + b)}]
        if i % multi_every == 0:
            msgs = ([{"role": "system", "content": "answer briefly"}] + msgs
                    + [{"role": "user", "content": "和尚 again"}, {"role": "assistant", "content": f"{a + b} sun"}])
        out.append({"messages": msgs})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def fmt(model_dir):
    return ChatFormat.from_model_dir(model_dir)


# --- rendering and the mask -----------------------------------------------------------------------
GEN_TEMPLATE = VELOCIS_TEMPLATE.replace(  # Velocis' template with transformers' {% generation %} around each reply
    "{{- '<|' + role + '|>\\n' + (message['content'] or '') + '<|end|>\\n' -}}",
    "{%- if role == 'assistant' -%}{{- '<|assistant|>\\n' -}}{% generation %}{{- (message['content'] or '') "
    "+ '<|end|>' -}}{% endgeneration %}{{- '\\n' -}}{%- else -%}"
    "{{- '<|' + role + '|>\\n' + (message['content'] or '') + '<|end|>\\n' -}}{%- endif -%}")


def test_ids_and_assistant_mask_equal_transformers(model_dir, fmt, tmp_path):
    """The saved dir's tokenizer_config.json carries the chat template, so transformers renders the same
    ids; our mask equals transformers' assistant mask of the template marked with {% generation %}."""
    from transformers import AutoTokenizer

    assert GEN_TEMPLATE != VELOCIS_TEMPLATE
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == VELOCIS_TEMPLATE
    assert fmt.template.builtin and fmt.template.stop_token_ids == [fmt.tokenizer.token_to_id("<|end|>")]
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    odd = [{"messages": [{"role": "user", "content": "\n\nlead newline"}, {"role": "assistant", "content": " x\n"},
                         {"role": "user", "content": ""}, {"role": "assistant", "content": "\n山 里\n\n"}]},
           {"prompt": "the cat", "completion": "sat 有座"},
           {"messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": "part "},
                                                           {"type": "text", "text": "two"}]}]}]
    records = read_conversations(write_jsonl(tmp_path / "c.jsonl", arithmetic(12) + odd))
    convs = render_conversations(fmt, records)
    end = fmt.tokenizer.token_to_id("<|end|>")
    for (where, messages), c in zip(records, convs):
        assert c.ids[0] == fmt.prompt_start and not c.mask[0]  # a conversation starts like a served prompt
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == c.ids[1:].tolist(), where
        marked = hf.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=GEN_TEMPLATE,
                                        return_assistant_tokens_mask=True)
        assert marked["input_ids"] == ids
        assert marked["assistant_masks"] == c.mask[1:].astype(int).tolist(), where
        # every assistant turn is scored, each ending with its <|end|>
        runs = np.flatnonzero(np.diff(np.concatenate([[0], c.mask.astype(int), [0]])) == -1) - 1
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        assert all(c.ids[r] == end for r in runs)


OWN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:\n{% endif %}")
OWN_MARKED = ("{% for m in messages %}### {{ m['role'] }}:\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
              "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")


def test_a_models_own_template_masks_up_to_its_eos(model_dir, tmp_path):
    """A template of the model's own (an imported model): no role tokens, turns end with EOS, and the
    reply's first characters may merge with the header's in BPE; the mask still equals transformers'."""
    from transformers import AutoTokenizer

    d = tmp_path / "own"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OWN_TEMPLATE}))
    fmt = ChatFormat.from_model_dir(d)
    assert not fmt.template.builtin and fmt.stop_ids == {fmt.tokenizer.eos_id}
    hf = AutoTokenizer.from_pretrained(str(d))
    records = read_conversations(write_jsonl(tmp_path / "o.jsonl", arithmetic(6) + [
        {"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": " cat sat"}]}]))
    for (where, messages), c in zip(records, render_conversations(fmt, records)):
        marked = hf.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=OWN_MARKED,
                                        return_assistant_tokens_mask=True)
        assert hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == c.ids[1:].tolist()
        assert marked["input_ids"] == c.ids[1:].tolist(), where
        assert marked["assistant_masks"] == c.mask[1:].astype(int).tolist(), where


def test_imported_template_is_kept_through_a_save(model_dir, tmp_path):
    """A tokenizer loaded with a template of its own (an imported model) saves it again."""
    chatml = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    d = tmp_path / "imported"
    d.mkdir()
    tok = Tokenizer.load(model_dir)
    tok.chat_template = chatml
    tok.save(d)
    assert Tokenizer.load(d).chat_template == chatml
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in json.loads(
        (d / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    (d / "chat_template.jinja").write_text(chatml)  # where newer transformers saves it
    assert Tokenizer.load(d).chat_template == chatml


# --- packing ----------------------------------------------------------------------------------------
def test_packing_keeps_conversations_apart_and_covers_each_once(fmt, tmp_path):
    data, report = chat_train_data(write_jsonl(tmp_path / "p.jsonl", arithmetic(30)), fmt, seq_len=64,
                                   batch_size=3, seed=5, val_fraction=0.1)
    loader = data.train
    assert report.train == 27 and report.val == 3 and report.conversations == 30
    assert 0.5 < report.fill <= 1 and report.rows == len(loader.rows(0))
    seen = []
    for x, y, p in (loader.batch(b) for b in loader.batches(0)):
        assert x.shape == y.shape == p.shape and x.shape[1] == 64
        for r in range(x.shape[0]):
            starts = [0] + [t for t in range(1, 64) if p[r, t] == 0]
            for s, e in zip(starts, starts[1:] + [64]):
                assert p[r, s:e].tolist() == list(range(e - s))  # positions restart at every conversation
                assert y[r, e - 1] == IGNORE_INDEX  # no target across a boundary
                seg = x[r, s:e].tolist()
                if seg[0] == fmt.prompt_start:
                    seen.append(tuple(seg))
                    # the targets are the next tokens where scored
                    scored = (y[r, s:e - 1] != IGNORE_INDEX)
                    assert torch.equal(y[r, s:e - 1][scored], x[r, s + 1:e][scored])
                else:
                    assert (y[r, s:e] == IGNORE_INDEX).all()  # padding scores nothing
    want = sorted(tuple(c.ids.tolist()) for c in loader.conversations)
    assert sorted(seen) == want  # every train conversation exactly once per epoch
    # scored tokens = the conversations' assistant masks
    total = sum(int((loader.batch(b)[1] != IGNORE_INDEX).sum()) for b in loader.batches(0))
    assert total == sum(int(c.mask[1:].sum()) for c in loader.conversations)
    # a different order each epoch, the same for the same (seed, epoch)
    assert loader.rows(0) != loader.rows(1)
    assert PackedChatLoader(loader.conversations, 64, 3, seed=5).rows(1) == loader.rows(1)


def test_loader_resumes_at_the_same_batch(fmt, tmp_path):
    data, _ = chat_train_data(write_jsonl(tmp_path / "r.jsonl", arithmetic(20)), fmt, seq_len=64, batch_size=2,
                              seed=1, val_fraction=0)
    it = iter(data.train)
    for _ in range(len(data.train) + 2):  # into the second epoch
        next(it)
    state = data.train.state_dict()
    want = next(it)
    again, _ = chat_train_data(tmp_path / "r.jsonl", fmt, seq_len=64, batch_size=2, seed=1, val_fraction=0)
    again.train.load_state_dict(state)
    got = next(iter(again.train))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(VelocisError, match="batch_size"):
        PackedChatLoader(again.train.conversations, 64, 3, seed=1).load_state_dict(state)


def test_first_fit_packing():
    rows = pack_rows(np.array([5, 5, 3, 7, 2, 8]), range(6), seq_len=10, open_rows=2)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 5, 3, 7, 2, 8][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # [5,5] [3,7] [2,8]


# --- the masking acceptance --------------------------------------------------------------------------
def _token_loss_and_grad(model, x, y, p, k):
    out = model(x, y, positions=p, reduction="none")
    grads = torch.autograd.grad(out.lm_loss[0, k], [q for q in model.parameters()])
    return out.lm_loss.detach(), grads


def test_changing_another_conversation_or_a_later_prompt_leaves_an_assistant_tokens_loss_and_gradient(fmt, tmp_path):
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=fmt.tokenizer.vocab_size, hidden_dim=32, num_layers=2, num_heads=2,
                            num_kv_heads=1, mlp_dim=64, max_seq_len=128, init_std=0.3)
    model = VelocisModel(model_cfg).eval()
    other = {"messages": [{"role": "user", "content": "the big red dog ran far"}, {"role": "assistant", "content": "sun"}]}
    mine = {"messages": [{"role": "user", "content": "3 + 4 ="}, {"role": "assistant", "content": "7"},
                         {"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}]}
    convs = render_conversations(fmt, read_conversations(write_jsonl(tmp_path / "m.jsonl", [other, mine])))
    loader = PackedChatLoader(convs, 96, 1, pad_id=0)
    x, y, p = loader.batch([[0, 1]])  # the other conversation first: what naive packing would let A see
    a0 = len(convs[0].ids)
    a_mask = convs[1].mask
    first_reply = a0 + int(np.flatnonzero(a_mask)[0]) - 1  # the position whose target is A's first reply token
    later_prompt = a0 + int(np.flatnonzero(a_mask)[1]) + 4  # <|end|> \n <|user|> \n: A's second user turn
    assert y[0, first_reply] != IGNORE_INDEX and y[0, later_prompt] == IGNORE_INDEX
    base_loss, base_grads = _token_loss_and_grad(model, x, y, p, first_reply)
    a_span = slice(a0, a0 + len(convs[1].ids))

    def changed(pos):
        x2 = x.clone()
        x2[0, pos] = (x2[0, pos] + 1) % 250 + 10
        return x2

    other_prompt, other_reply = 4, int(np.flatnonzero(convs[0].mask)[0])
    for pos in (other_prompt, other_reply, later_prompt):
        loss, grads = _token_loss_and_grad(model, changed(pos), y, p, first_reply)
        if pos != later_prompt:  # the whole of A is untouched by the other conversation
            torch.testing.assert_close(loss[0, a_span], base_loss[0, a_span], atol=1e-6, rtol=0)
        torch.testing.assert_close(loss[0, first_reply], base_loss[0, first_reply], atol=1e-6, rtol=0)
        for g, g0 in zip(grads, base_grads):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    # the packed loss is exactly the conversations' own: A alone, unpacked, gives the same per-token losses
    xa, ya, pa = PackedChatLoader([convs[1]], len(convs[1].ids), 1).batch([[0]])
    alone = model(xa, ya, positions=pa, reduction="none").lm_loss.detach()
    torch.testing.assert_close(base_loss[0, a_span], alone[0], atol=1e-5, rtol=1e-5)
    # the test can fail: without the position reset (naive packing) the other conversation leaks into A
    naive = model(x, y, reduction="none").lm_loss.detach()
    naive2 = model(changed(other_prompt), y, reduction="none").lm_loss.detach()
    assert (naive[0, a_span] - naive2[0, a_span]).abs().max() > 1e-4


# --- normalisation over the step's assistant tokens ----------------------------------------------------------
def test_loss_is_normalised_over_the_steps_assistant_tokens(model_dir, fmt, tmp_path):
    from velocis.train import TrainConfig, Trainer

    data, _ = chat_train_data(write_jsonl(tmp_path / "n.jsonl", arithmetic(24)), fmt, seq_len=64, batch_size=2,
                              seed=0, val_fraction=0)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), init_from=str(model_dir), max_steps=2, batch_size=2,
                      seq_len=64, grad_accum=2, device="cpu", monitor="none", plot=False, precision="fp32")
    tr = Trainer(cfg, ModelConfig.load(model_dir / "config.json"), objective=SFTObjective(), data=data)
    try:
        b1 = data.train.batch([[1]])  # one short conversation
        b2 = data.train.batch(data.train.rows(0)[:4])  # four full rows: many more assistant tokens
        n1, n2 = (int((b[1] != IGNORE_INDEX).sum()) for b in (b1, b2))
        assert n2 > 3 * n1
        total, stats = tr.accumulate([b1, b2])
        grads = [q.grad.clone() for q in tr.model.parameters()]
        tr.model.zero_grad()
        x, y, p = (torch.cat([a, b]) for a, b in zip(b1, b2))
        ref = tr.model(x, y, positions=p)  # one batch, mean over all its assistant tokens
        ref.lm_loss.backward()
        torch.testing.assert_close(total, ref.lm_loss.detach(), atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, (q.grad for q in tr.model.parameters())):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
        assert stats["assistant_tokens"] == (n1 + n2) / 2
        summed, count = SFTObjective().evaluate(tr.model, b2)
        assert count == n2 and summed > 0
    finally:
        tr.close()


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, match", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"b\.jsonl:2: the conversation has no assistant turn"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     r"b\.jsonl:2: message 0 has the unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "hi"}', r"b\.jsonl:2: not valid JSON"),
    ('{"text": "pretraining text"}', r"b\.jsonl:2: no \"messages\" list"),
    ('{"messages": []}', r"b\.jsonl:2: \"messages\" must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
     r"b\.jsonl:2: message 0's content must be a string"),
    ('[1, 2]', r"b\.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(fmt, tmp_path, line, match):
    good = json.dumps(arithmetic(1)[0])
    (tmp_path / "b.jsonl").write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(VelocisError, match=match):
        chat_train_data(tmp_path / "b.jsonl", fmt, seq_len=64, batch_size=2)


def test_empty_file_missing_file_and_too_long(fmt, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(VelocisError, match="empty.jsonl: no conversations"):
        chat_train_data(tmp_path / "empty.jsonl", fmt, seq_len=64, batch_size=2)
    with pytest.raises(VelocisError, match="no such file"):
        chat_train_data(tmp_path / "nope.jsonl", fmt, seq_len=64, batch_size=2)
    long = {"messages": [{"role": "user", "content": " ".join(["the cat"] * 40)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "long.jsonl", arithmetic(4) + [long] + arithmetic(3, seed=1))
    data, report = chat_train_data(path, fmt, seq_len=60, batch_size=2, val_fraction=0)
    assert report.conversations == 8 and report.train == 7  # skipped, and counted
    assert report.too_long[0][0].endswith("long.jsonl:5") and "skipped 1 of 8" in report.summary()
    with pytest.raises(VelocisError, match="every conversation is longer than seq_len 8"):
        chat_train_data(path, fmt, seq_len=8, batch_size=2)


def test_val_split_sizes(fmt, tmp_path):
    for n, fraction, want in ((1, 0.05, 0), (2, 0.05, 1), (40, 0.1, 4), (40, 0.0, 0)):
        data, report = chat_train_data(write_jsonl(tmp_path / f"v{n}.jsonl", arithmetic(n)), fmt, seq_len=64,
                                       batch_size=2, val_fraction=fraction)
        assert report.val == want and (data.val is None) == (want == 0)
    with pytest.raises(VelocisError, match="--val-fraction"):
        chat_train_data(tmp_path / "v2.jsonl", fmt, seq_len=64, batch_size=2, val_fraction=1.0)


# --- the command -------------------------------------------------------------------------------------
def test_velocis_sft_end_to_end(model_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic(80))
    out = tmp_path / "sft"
    rc = main(["sft", "--data", str(data), "--model-dir", str(model_dir), "--output-dir", str(out),
               "--seq-len", "64", "--batch-size", "4", "--max-steps", "40", "--lr", "3e-3", "--eval-every", "20",
               "--eval-batches", "2", "--device", "cpu", "--monitor", "none", "--no-plot"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "80 conversations (76 train, 4 val)" in printed.out and "done: 40 steps" in printed.out
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in evals if r["type"] == "eval"]
    assert evals[-1] < 0.6 * evals[0]  # it learns the replies' format (and some sums)
    model, tok = load_model_dir(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == VELOCIS_TEMPLATE
    assert json.loads((out / "train_config.json").read_text())["init_from"] == str(model_dir)
    assert main(["generate", "--model", str(out), "--prompt", "3 + 4 =", "--max-new-tokens", "3", "--device", "cpu",
                 "--temperature", "0", "--quiet"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("3 + 4 =\n"))
    assert main(["chat", "--model", str(out), "--max-tokens", "4", "--temperature", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    # the output dir holds a run: a second run there is refused, the model dir itself too
    assert main(["sft", "--data", str(data), "--model-dir", str(model_dir), "--output-dir", str(out)]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["sft", "--data", str(data), "--model-dir", str(model_dir), "--output-dir", str(model_dir)]) == 2
    assert "is the input directory" in capsys.readouterr().err
