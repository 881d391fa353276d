"""LoRA: a fresh adapter leaves the output unchanged, only adapters train, merging equals the adapted
model, adapters round-trip through their files, the trainer's hooks (adapters after init_from, the
run's model dir merged, exact resume), decoding does not skip an adapter, and `velocis sft --lora-rank`."""
import json
import random
import shutil

import pytest
import torch

from velocis.align.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, has_lora, load_adapters,
                                lora_disabled, lora_settings, lora_state_dict, lora_trainer_hooks, merge_lora,
                                merged_model, save_adapters)
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.model_io import load_model_dir, model_state, save_model
from velocis.models import VelocisModel
from velocis.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **kw) -> VelocisModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64, max_seq_len=128,
               init_std=0.3)
    return VelocisModel(ModelConfig(**{**cfg, **kw})).eval()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def close(a, b):
    """Equal to fp32 rounding at the logits' scale (1e-5 of the largest)."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


X = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_fresh_adapters_leave_the_output_unchanged_and_only_they_train():
    model = tiny()
    ref = model(X).detach()
    apply_lora(model, rank=4)
    names = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(names) == 2 * 7 and "layers.1.mixer.q_proj" in names and "layers.0.feed_forward.down_proj" in names
    assert close(model(X), ref)  # B = 0 (to rounding: a frozen base may take the inference kernels)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    model.train()
    model(X, X).loss.backward()
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        elif n.endswith("lora_A"):
            assert p.grad is not None and p.grad.abs().sum() == 0  # B = 0: nothing reaches A yet
        else:
            assert p.grad is None
    # the optimizer holds the adapters only (frozen parameters are left out)
    from velocis.train.config import TrainConfig
    from velocis.train.optim import build_optimizer

    opt = build_optimizer(model.parameters(), TrainConfig(), torch.device("cpu"))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_merge_equals_the_adapted_model_and_disabled_equals_the_base():
    model = tiny()
    base_out = model(X).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=6)
    randomise_adapters(model)
    adapted = model(X).detach()
    assert (adapted - base_out).abs().max() > 1e-2
    with lora_disabled(model):
        assert close(model(X), base_out)
    twin = merged_model(model)  # for export: the trained model keeps its adapters
    assert has_lora(model) and not has_lora(twin)
    assert close(twin(X), adapted)
    assert set(model_state(twin)) == set(model_state(tiny()))  # an ordinary model's tensors
    for k, v in model.state_dict().items():  # base weights untouched
        if k in base_state:
            assert torch.equal(v, base_state[k])
    merge_lora(model)
    assert not has_lora(model)
    assert close(model(X), adapted)


def test_adapters_round_trip_through_their_files(tmp_path):
    model = tiny()
    apply_lora(model, rank=3, targets=["q_proj", "v_proj"])
    randomise_adapters(model)
    want = model(X).detach()
    save_adapters(model, tmp_path, base_model="base-dir")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6.0
    assert config["target_modules"] == sorted(f"layers.{i}.mixer.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / ADAPTER_WEIGHTS))
    assert "base_model.model.layers.0.mixer.q_proj.lora_A.weight" in keys and len(keys) == 8
    fresh = load_adapters(tiny(), tmp_path)
    torch.testing.assert_close(fresh(X), want, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(model).values()))
    with pytest.raises(VelocisError, match="no LoRA adapters here"):
        load_adapters(tiny(), tmp_path / "nope")
    with pytest.raises(VelocisError, match="the model needs"):
        load_adapters(tiny(hidden_dim=64, num_heads=4, num_kv_heads=2), tmp_path)


def test_bad_settings_are_refused():
    import argparse

    from velocis.align.lora import add_lora_arguments

    with pytest.raises(VelocisError, match="o_proj"):  # names the model's projections
        apply_lora(tiny(), rank=4, targets=["qproj"])
    with pytest.raises(VelocisError, match="lm_head.weight directly"):
        apply_lora(tiny(), rank=4, targets=["lm_head"])
    with pytest.raises(VelocisError, match="not a linear layer"):
        apply_lora(tiny(), rank=4, targets=["mixer"])
    with pytest.raises(VelocisError, match="positive"):
        apply_lora(tiny(), rank=0)
    model = apply_lora(tiny(), rank=2)
    with pytest.raises(VelocisError, match="already has LoRA"):
        apply_lora(model, rank=2)
    p = argparse.ArgumentParser()
    add_lora_arguments(p)
    assert lora_settings(p.parse_args([])) is None and lora_trainer_hooks(p.parse_args([])) == {}
    with pytest.raises(VelocisError, match="need --lora-rank"):
        lora_settings(p.parse_args(["--lora-alpha", "16"]))
    with pytest.raises(VelocisError, match="--lora-dropout"):
        lora_settings(p.parse_args(["--lora-rank", "4", "--lora-dropout", "1.5"]))
    s = lora_settings(p.parse_args(["--lora-rank", "4", "--lora-targets", "q_proj, o_proj"]))
    assert s.targets == ("q_proj", "o_proj") and s.alpha is None


def test_mla_model_takes_the_default_targets_it_has():
    model = tiny(mixer="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    ref = model(X).detach()
    apply_lora(model, rank=2)  # no q_proj (q_a_proj / q_b_proj) and kv_b_proj is refused: the rest
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert names == {"o_proj", "gate_proj", "up_proj", "down_proj"}
    assert close(model(X), ref)
    with pytest.raises(VelocisError, match="kv_b_proj"):
        apply_lora(tiny(mixer="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
                   rank=2, targets=["kv_b_proj"])


def test_generation_does_not_skip_the_adapters():
    """A LoRALinear is not an nn.Linear, so the C++ decode path (which packs nn.Linear weights) is not
    taken for it: the adapted model generates what its merged twin does."""
    from velocis.infer.generate import generate_ids
    from velocis.kernels.decode_cpu import why_not

    model = apply_lora(tiny(), rank=4)
    randomise_adapters(model, seed=3)
    twin = merged_model(model)
    assert why_not(model) is not None
    prompt = [[5, 17, 42, 8]]
    got = torch.stack(list(generate_ids(model, prompt, 8))).tolist()
    want = torch.stack(list(generate_ids(twin, prompt, 8))).tolist()
    assert got == want


# --- with the trainer and the command -------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "山", "里"]
    (root / "t.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) + f" {i}" for i in range(120)))
    tok = Tokenizer.train([str(root / "t.txt")], vocab_size=280, progress=False)
    return save_model(tiny(), tok, root / "base")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("lora_data") / "chat.jsonl"
    lines = []
    for _ in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{a} + {b} ="},
                                              {"role": "assistant", "content": str(a + b)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _lora_trainer(model_dir, chat_file, out, resume=None):
    import argparse

    from velocis.align.chat_data import ChatFormat, chat_train_data
    from velocis.align.sft import SFTObjective
    from velocis.train import TrainConfig, Trainer

    data, _ = chat_train_data(chat_file, ChatFormat.from_model_dir(model_dir), seq_len=64, batch_size=2,
                              val_fraction=0.1)
    cfg = TrainConfig(output_dir=str(out), init_from=str(model_dir), max_steps=4, batch_size=2, seq_len=64, lr=1e-2,
                      warmup_steps=1, save_every=2, eval_every=2, eval_batches=1, device="cpu", monitor="none",
                      plot=False, precision="fp32")
    args = argparse.Namespace(lora_rank=4, lora_alpha=None, lora_targets=None, lora_dropout=0.0)
    return Trainer(cfg, ModelConfig.load(model_dir / "config.json"), objective=SFTObjective(), data=data,
                   resume=resume, **lora_trainer_hooks(args))


def test_trainer_hooks_train_adapters_export_merged_and_resume_exactly(model_dir, chat_file, tmp_path):
    base, _ = load_model_dir(model_dir)
    tr = _lora_trainer(model_dir, chat_file, tmp_path / "a")
    tr.run()
    trained = tr.model
    # the base stayed frozen at init_from's weights; the adapters moved
    for k, v in model_state(base).items():
        assert torch.equal(trained.state_dict()[k], v), k
    assert any(m.lora_B.abs().sum() > 0 for m in trained.modules() if isinstance(m, LoRALinear))
    # the run dir (and best/) is the merged model, loadable as any model
    root, _ = load_model_dir(tmp_path / "a")
    best, _ = load_model_dir(tmp_path / "a" / "best")
    assert not has_lora(root) and not has_lora(best)
    assert close(root(X), trained.eval()(X))
    # resume from step 2: the same adapters at step 4 as the uninterrupted run
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_4")
    again = _lora_trainer(model_dir, chat_file, tmp_path / "b", resume="auto")
    assert again.step == 2
    again.run()
    for (k, a), b in zip(lora_state_dict(trained).items(), lora_state_dict(again.model).values()):
        assert torch.equal(a, b), k


def test_velocis_sft_with_lora(model_dir, chat_file, tmp_path, capsys):
    from velocis.cli import main

    out = tmp_path / "sft"
    common = ["--data", str(chat_file), "--model-dir", str(model_dir), "--output-dir", str(out), "--seq-len", "64",
              "--batch-size", "4", "--device", "cpu", "--monitor", "none", "--no-plot"]
    assert main(["sft", *common, "--max-steps", "3", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,up_proj"]) == 0
    assert "(merged; adapters beside it)" in capsys.readouterr().out
    # root = base + the saved adapters, merged
    base, _ = load_model_dir(model_dir)
    want = merge_lora(load_adapters(load_model_dir(model_dir)[0], out))
    root, _ = load_model_dir(out)
    for k, v in model_state(want).items():
        torch.testing.assert_close(model_state(root)[k], v, atol=1e-6, rtol=1e-6)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(model_dir)
    q = "layers.0.mixer.q_proj.weight"
    assert not torch.equal(model_state(root)[q], model_state(base)[q])
    # a LoRA run resumes only as one
    assert main(["sft", *common, "--max-steps", "4", "--resume"]) == 2
    assert "trained with LoRA adapters" in capsys.readouterr().err
    # --overwrite as a full fine-tune removes the stale adapters
    assert main(["sft", *common, "--max-steps", "1", "--overwrite"]) == 0
    assert not (out / ADAPTER_WEIGHTS).exists()
