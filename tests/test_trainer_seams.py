"""The trainer's seams: token-normalised micro-batches, averaged stats, schedules that reach their
floor, the time budget across a resume, Python-API resume, step hooks, objectives with extra models."""
import json
import time
from pathlib import Path

import pytest
import torch

from velocis.config import ModelConfig, get_preset
from velocis.train import NextTokenObjective, Objective, TrainConfig, Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def model_cfg(data_dir, **kw) -> ModelConfig:
    from velocis.tokenizer import Tokenizer

    tok = Tokenizer.load(data_dir)
    return get_preset("micro", vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_dim=64, max_seq_len=32, **kw)


def train_cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), data_dir=str(data_dir), max_steps=4, batch_size=2, seq_len=16, device="cpu",
                monitor="none", plot=False, save_every=100, eval_every=100, eval_batches=1, precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_micro_batches_are_normalised_by_the_steps_valid_tokens(tiny_data_dir, tmp_path):
    """Masked tokens weigh the same whatever micro-batch they fall in: two micro-batches with very
    different numbers of scored tokens give the gradient of one batch of both."""
    tr = Trainer(train_cfg(tiny_data_dir, tmp_path / "r", grad_accum=2), model_cfg(tiny_data_dir))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 500, (4, 16), generator=g)
    y = torch.randint(0, 500, (4, 16), generator=g)
    y[:2, 2:] = -100  # micro-batch 1 scores 4 tokens, micro-batch 2 scores 32
    total, stats = tr.accumulate([(x[:2], y[:2]), (x[2:], y[2:])])
    grads = [p.grad.clone() for p in tr.model.parameters()]
    tr.model.zero_grad()
    ref = tr.model(x, y)  # one batch, mean over its 36 scored tokens
    ref.lm_loss.backward()
    torch.testing.assert_close(total, ref.lm_loss.detach(), atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, (p.grad for p in tr.model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    # logged stats are the mean over the micro-batches, not the last one's
    with torch.no_grad():
        first, second = tr.model(x[:2], y[:2]).stats["lm_loss"], tr.model(x[2:], y[2:]).stats["lm_loss"]
    assert stats["lm_loss"] == pytest.approx(float(first + second) / 2, rel=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedules_reach_their_floor_on_the_last_step(tiny_data_dir, tmp_path, schedule):
    tr = Trainer(train_cfg(tiny_data_dir, tmp_path / schedule, max_steps=10, warmup_steps=2, schedule=schedule,
                           lr=1e-3, min_lr_ratio=0.1), model_cfg(tiny_data_dir))
    lrs = []
    for step in range(10):
        tr.step = step
        lrs.append(tr.lr_now())
    assert lrs[-1] == pytest.approx(1e-4)  # before: progress was taken before the step (wsd ended at 0.55)
    assert max(lrs) > 0.95e-3


def test_time_budget_checkpoint_counts_that_steps_eval_and_save(tiny_data_dir, tmp_path, monkeypatch):
    """A checkpoint's clock includes the eval of its step, so a run resumed from it stands where the
    uninterrupted run stood (before, each resume gained that step's eval and save time)."""
    orig = Trainer.evaluate

    def slow_eval(self):
        time.sleep(0.4)
        return orig(self)

    monkeypatch.setattr(Trainer, "evaluate", slow_eval)
    cfg = train_cfg(tiny_data_dir, tmp_path / "tb", max_steps=2, time_budget=10.0, eval_every=1, save_every=1)
    result = train(cfg, model_cfg(tiny_data_dir))
    from velocis.train.state_io import load_state

    state = load_state(Path(result.run_dir) / "checkpoints" / "step_1")
    assert state["elapsed"] >= 0.4  # step 1's eval ran before its save
    assert result.elapsed_s >= 0.8


def test_python_api_resume_with_a_config_lacking_special_ids(tiny_data_dir, tmp_path):
    """The checkpoint's config has the tokenizer's bos/eos/pad ids; a caller's config without them resumes."""
    mc = model_cfg(tiny_data_dir)
    assert mc.eos_token_id is None
    first = train(train_cfg(tiny_data_dir, tmp_path / "api", max_steps=2, save_every=2), mc)
    assert first.step == 2
    again = train(train_cfg(tiny_data_dir, tmp_path / "api", max_steps=3, save_every=2), mc, resume="auto")
    assert again.step == 3


class ValueHeadObjective(NextTokenObjective):
    """An objective holding a second trainable model (a value head on the final hidden state)."""

    name = "value-head-test"

    def setup(self, model, device):
        self.head = torch.nn.Linear(model.config.hidden_dim, 1).to(device)
        self.start = self.head.weight.detach().clone()

    def modules(self):
        return {"value_head": self.head}

    def __call__(self, model, batch, num_tokens):
        x, y = batch
        out = model(x, y, reduction="sum", return_hidden=True)
        value = self.head(out.hidden.detach()).squeeze(-1)
        loss = out.lm_loss / num_tokens + ((value - 1.0) ** 2).sum() / num_tokens
        return loss, out.stats


def test_objective_with_its_own_trainable_model(tiny_data_dir, tmp_path):
    obj = ValueHeadObjective()
    tr = Trainer(train_cfg(tiny_data_dir, tmp_path / "vh"), model_cfg(tiny_data_dir), objective=obj)
    tr.train_step()
    assert not torch.equal(obj.head.weight, obj.start)  # the optimizer trains it


def test_moe_bias_updates_from_the_optimizer_hook(tiny_data_dir, tmp_path):
    """The trainer names no architecture: the MoE layers' after_optimizer_step hook moves the bias."""
    mc = model_cfg(tiny_data_dir, num_experts=4, num_experts_per_token=2, moe_dim=32, balance="aux_free")
    tr = Trainer(train_cfg(tiny_data_dir, tmp_path / "moe"), mc)
    bias = tr.model.layers[0].feed_forward.gate.e_score_correction_bias
    assert bias.abs().sum() == 0
    tr.train_step()
    assert bias.abs().sum() > 0


def test_resume_never_runs_code_from_a_checkpoint(tiny_data_dir, tmp_path):
    """The trainer state is JSON + safetensors; an old-style trainer_state.pt carrying a __reduce__
    payload is refused without running it."""
    import os

    from velocis.errors import VelocisError

    run = tmp_path / "evil"
    train(train_cfg(tiny_data_dir, run, max_steps=2, save_every=2), model_cfg(tiny_data_dir))
    ckpt = run / "checkpoints" / "step_2"
    assert {"trainer_state.json", "trainer_state.safetensors"} <= {p.name for p in ckpt.iterdir()}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "trainer_state.json").unlink()
    (ckpt / "trainer_state.safetensors").unlink()
    torch.save({"step": 2, "x": Payload()}, ckpt / "trainer_state.pt")
    with pytest.raises(VelocisError, match="safely"):
        train(train_cfg(tiny_data_dir, run, max_steps=3), model_cfg(tiny_data_dir), resume="auto")
    assert not marker.exists()


def test_legacy_pickle_checkpoints_still_resume(tiny_data_dir, tmp_path):
    """A checkpoint from before the JSON format (its state pickled, numpy RNG inside) still resumes."""
    from velocis.train.state_io import load_state

    run = tmp_path / "legacy"
    train(train_cfg(tiny_data_dir, run, max_steps=2, save_every=2), model_cfg(tiny_data_dir))
    ckpt = run / "checkpoints" / "step_2"
    torch.save(load_state(ckpt), ckpt / "trainer_state.pt")  # what the old trainer wrote
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "trainer_state.safetensors").unlink()
    assert train(train_cfg(tiny_data_dir, run, max_steps=3), model_cfg(tiny_data_dir), resume="auto").step == 3
