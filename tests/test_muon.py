"""Muon (train/muon.py): the update equals a plain reference and torch.optim.Muon, AdamW groups equal
torch.optim.AdamW, the right parameters take Muon, and a run with --optimizer muon resumes exactly."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from velocis.errors import VelocisError
from velocis.train.config import TrainConfig
from velocis.train.muon import MuonAdamW, orthogonalize
from velocis.train.optim import build_optimizer, takes_muon


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5, one matrix, fp32, written out plainly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.clone()
    transposed = g.shape[0] > g.shape[1]
    if transposed:
        x = x.T
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def reference_muon_steps(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, mu: float) -> torch.Tensor:
    w, buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        buf = mu * buf + (1 - mu) * g
        direction = (1 - mu) * g + mu * buf  # Nesterov
        if w.dim() == 3:
            o = torch.stack([reference_newton_schulz(d) for d in direction])
        else:
            o = reference_newton_schulz(direction)
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape[-2:])) * o
    return w


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 12)])
def test_muon_update_equals_the_plain_reference(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [p], "muon": True, "weight_decay": 0.1}], lr=0.01, momentum=0.9)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = reference_muon_steps(w0, grads, lr=0.01, wd=0.1, mu=0.9)
    assert torch.allclose(p.detach(), want, atol=1e-5, rtol=1e-5)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(1)
    s = torch.linalg.svdvals(orthogonalize(torch.randn(64, 96)))
    assert s.min() > 0.5 and s.max() < 1.5  # the quintic's documented band around 1


def test_muon_update_matches_torch_muon():
    torch.manual_seed(2)
    w0 = torch.randn(32, 48)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [ours], "muon": True, "weight_decay": 0.1}], lr=0.02, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(32, 48)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    # both orthogonalise in bf16; the order of bf16 roundings differs, not the update
    assert torch.allclose(ours.detach(), theirs.detach(), atol=3e-3)
    assert not torch.equal(ours.detach(), w0)


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(3)
    tensors = [torch.randn(8, 6), torch.randn(6)]
    ours = [torch.nn.Parameter(t.clone()) for t in tensors]
    theirs = [torch.nn.Parameter(t.clone()) for t in tensors]
    opt = MuonAdamW([{"params": [ours[0]], "weight_decay": 0.1}, {"params": [ours[1]], "weight_decay": 0.0}],
                    lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1}, {"params": [theirs[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_which_parameters_take_muon():
    from velocis.config import get_preset
    from velocis.models import VelocisModel

    with torch.device("meta"):
        model = VelocisModel(get_preset("small", num_layers=2))
    muon = {n for n, p in model.named_parameters() if takes_muon(n, p)}
    assert "layers.0.mixer.q_proj.weight" in muon and "layers.1.feed_forward.experts.gate_up_proj" in muon
    assert not {"embed_tokens.weight", "layers.1.feed_forward.gate.weight", "norm.weight"} & muon
    assert not takes_muon("lm_head.weight", torch.empty(4, 4)) and not takes_muon("value_head.weight", torch.empty(1, 4))
    assert not takes_muon("layers.0.mixer.convNd.weight", torch.empty(8, 1, 4))
    assert not takes_muon("layers.0.mixer.q_proj.lora_A", torch.empty(4, 8))
    opt = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_with_fsdp_and_unknown_optimizers_are_refused():
    with pytest.raises(VelocisError, match="--parallel ddp"):
        TrainConfig(optimizer="muon", parallel="fsdp").validate()
    with pytest.raises(VelocisError, match="adamw or muon"):
        TrainConfig(optimizer="sgd").validate()


def test_a_muon_run_resumes_exactly(tiny_data_dir, tmp_path):
    from velocis.cli import main

    def argv(out, *extra):
        return ["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(out), "--hidden-dim", "64",
                "--num-layers", "2", "--num-heads", "2", "--mlp-dim", "128", "--max-seq-len", "64", "--batch-size",
                "4", "--seq-len", "32", "--device", "cpu", "--precision", "fp32", "--monitor", "none",
                "--eval-batches", "1", "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--keep-last",
                "3", "--optimizer", "muon", "--no-plot", *extra]

    assert main(argv(tmp_path / "a")) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_6")
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    assert main(argv(tmp_path / "b", "--resume", "auto")) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r.get("type") == "train"}

    first, again = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert {s: first[s] for s in (4, 5, 6)} == {s: again[s] for s in (4, 5, 6)}
    assert first[6] < first[1]


def test_embedding_and_head_take_their_own_rate(tiny_data_dir, tmp_path):
    from velocis.config import get_preset
    from velocis.train import Trainer

    for optimizer in ("adamw", "muon"):
        cfg = TrainConfig(output_dir=str(tmp_path / optimizer), data_dir=str(tiny_data_dir), batch_size=2, seq_len=16,
                          max_steps=1, device="cpu", monitor="none", plot=False, optimizer=optimizer,
                          embed_lr_scale=5.0, lr=1e-3, warmup_steps=0)
        trainer = Trainer(cfg, get_preset("micro", hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                                          max_seq_len=32, tie_embeddings=False))
        try:
            trainer.train_step()
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            rates = {names[id(p)]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
        finally:
            trainer.close()
        assert rates["embed_tokens.weight"] == rates["lm_head.weight"] == pytest.approx(5 * rates["norm.weight"])
        assert rates["layers.0.mixer.q_proj.weight"] == pytest.approx(rates["norm.weight"])
