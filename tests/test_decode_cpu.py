"""The whole-model C++ decode path (kernels/decode_cpu.py) against its references.

Float weights: logits equal VelocisModel.forward to fp32 rounding, for chunked prefill and
one-token steps. Quantized matrices: the kernel equals an exact emulation of its scheme (int8
activations per 32 values against the stored codes) to fp32 rounding, and the weight-only
dequantized reference (what QuantLinear computes) to the relative error stated below.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from velocis.config import ModelConfig
from velocis.infer.generate import generate_ids
from velocis.kernels import cpu_ops, decode_cpu
from velocis.models import VelocisModel
from velocis.quant import QSpec, quantize_model
from velocis.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="C++ CPU kernels unavailable")

# int8 activations (per 32 values) against the weight-only reference: the stated bound
QUANT_REL_ERR = 2e-2


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=320, hidden_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192,
                max_seq_len=160, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def planned_logits(model, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits at positions split-1 .. T-1: a prefill chunk of `split` tokens, then single steps."""
    plan = decode_cpu.decode_plan(model)
    assert plan is not None, decode_cpu.why_not(model)
    cache = plan.new_cache(ids.numel())
    out = [plan.forward(ids[:split], 0, cache)]
    out += [plan.forward(ids[t:t + 1], t, cache) for t in range(split, ids.numel())]
    return torch.stack(out)


@pytest.mark.parametrize("kw", [
    {},
    dict(num_kv_heads=4),  # MHA
    dict(num_kv_heads=1, tie_embeddings=True),  # MQA, tied head
    dict(qkv_bias=True),  # Qwen2
    dict(qk_norm=True, head_dim=48),  # Qwen3, q/k width != hidden
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 32}),
    dict(rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 64}),
])
def test_float_logits_equal_the_model_forward(kw, one_thread):
    torch.manual_seed(0)
    model = VelocisModel(tiny(**kw)).eval()
    for m in model.modules():  # nonzero biases and norm weights, so they are really exercised
        for name in ("bias", "weight"):
            p = getattr(m, name, None)
            if isinstance(p, torch.nn.Parameter) and p.dim() == 1:
                torch.nn.init.normal_(p, 1.0 if name == "weight" else 0.0, 0.1)
    ids = torch.randint(0, 320, (90,))  # 90 > one 64-token prefill chunk
    with torch.inference_mode():
        ref = model(ids[None])[0]
        got = planned_logits(model, ids, 70)
    assert rel(got, ref[69:]) < 1e-5


def test_bf16_weights_equal_the_fp32_forward_of_the_same_weights(one_thread):
    torch.manual_seed(1)
    model = VelocisModel(tiny()).eval().to(torch.bfloat16)
    ids = torch.randint(0, 320, (24,))
    with torch.inference_mode():
        ref = copy.deepcopy(model).float()(ids[None])[0]
        got = planned_logits(model, ids, 16)
    assert rel(got, ref[15:]) < 1e-5  # bf16 widens exactly; the C++ path accumulates in fp32


def emulated(x: torch.Tensor, lin: QuantLinear) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch: x rounded to int8 per 32 values with scale amax/127."""
    xb = x.view(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0) * d
    return xq.view_as(x) @ lin.dequantize(torch.float32).t()


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (8, 32, True), (8, 128, True), (4, 32, False),
                                            (4, 64, True), (4, 128, False)])
@pytest.mark.parametrize("rows,cols,T", [(37, 128, 1), (64, 256, 3), (19, 384, 5), (21, 96, 2)])  # 96: an odd block count
def test_quantized_kernels_match_their_scheme_and_the_reference(bits, group, sym, rows, cols, T, one_thread):
    if group and cols % group:
        pytest.skip("columns not a multiple of the group")
    torch.manual_seed(rows + cols)
    lin = torch.nn.Linear(cols, rows, bias=False)
    q = QuantLinear.from_linear(lin, QSpec(bits, group, sym))
    x = torch.randn(T, cols)
    got = decode_cpu.matvec(x, q)
    ref = F.linear(x, q.dequantize(torch.float32))
    assert rel(got, emulated(x, q)) < 1e-5
    assert rel(got, ref) < QUANT_REL_ERR
    assert rel(decode_cpu.matvec(x, q, exact=True), ref) < 1e-5  # weight-only: the reference's arithmetic


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quant_linear_on_cpu_runs_the_weight_only_kernels_for_a_few_rows(bits, group, monkeypatch):
    torch.manual_seed(4)
    lin = torch.nn.Linear(128, 48)
    q = QuantLinear.from_linear(lin, QSpec(bits, group, bits == 8))
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        got = q(x)
        assert getattr(q, "_decode_pack", (None, None))[1] is not None  # the kernel ran
        monkeypatch.setenv("VELOCIS_DECODE_KERNEL", "0")
        ref = q(x)
    assert rel(got, ref) < 1e-5
    assert rel(got, F.linear(x, q.dequantize(torch.float32), lin.bias)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_kernels_match_f_linear(dtype, one_thread):
    torch.manual_seed(2)
    lin = torch.nn.Linear(100, 37, bias=False).to(dtype)  # 100: not a multiple of 8; 37 rows: scalar tail
    x = torch.randn(3, 100)
    assert rel(decode_cpu.matvec(x, lin), F.linear(x, lin.weight.float())) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_logits_near_its_reference_and_tokens_agree(bits, one_thread):
    torch.manual_seed(3)
    model = VelocisModel(tiny(max_seq_len=64)).eval()
    quantize_model(model, bits=bits, group_size=32)
    ids = torch.randint(0, 320, (20,))
    with torch.inference_mode():
        ref = model(ids[None])[0]
        got = planned_logits(model, ids, 12)
    assert rel(got, ref[11:]) < QUANT_REL_ERR


def test_generate_uses_the_plan_and_equals_the_model_forward(monkeypatch, one_thread):
    torch.manual_seed(4)
    model = VelocisModel(tiny()).eval()
    prompt = torch.randint(0, 320, (9,)).tolist()
    fast = [int(t) for t in generate_ids(model, [prompt], 30)]
    monkeypatch.setenv("VELOCIS_DECODE_KERNEL", "0")
    assert decode_cpu.decode_plan(model) is None
    assert [int(t) for t in generate_ids(model, [prompt], 30)] == fast


def test_stop_ids_end_planned_generation(one_thread):
    torch.manual_seed(5)
    model = VelocisModel(tiny()).eval()
    first = [int(t) for t in generate_ids(model, [[1, 2, 3]], 12)]
    out = [int(t) for t in generate_ids(model, [[1, 2, 3]], 12, stop_ids={first[4]})]
    assert out == first[:first.index(first[4]) + 1]


def test_plan_follows_in_place_weight_changes(one_thread):
    torch.manual_seed(6)
    model = VelocisModel(tiny()).eval()
    ids = torch.randint(0, 320, (8,))
    before = planned_logits(model, ids, 8)
    with torch.no_grad():
        model.layers[0].feed_forward.down_proj.weight.mul_(3.0)
        model.norm.weight.add_(0.5)  # a vector the plan would otherwise have copied
        ref = model(ids[None])[0, -1]
    after = planned_logits(model, ids, 8)
    assert rel(after[0], ref) < 1e-5 and rel(after[0], before[0]) > 1e-3


@pytest.mark.parametrize("kw,why", [
    (dict(num_experts=4, mlp_dim=64), "moe"),
    (dict(mixer="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16), "mla"),
])
def test_other_models_fall_back_with_a_reason(kw, why, one_thread):
    model = VelocisModel(tiny(**kw)).eval()
    assert decode_cpu.decode_plan(model) is None and why in decode_cpu.why_not(model)
    assert len(list(generate_ids(model, [[1, 2, 3]], 4))) == 4


def test_quantized_width_not_a_multiple_of_32_falls_back(one_thread):
    model = VelocisModel(tiny(hidden_dim=120, num_heads=4, mlp_dim=200)).eval()
    quantize_model(model, bits=8, group_size=None)
    assert "multiple of 32" in decode_cpu.why_not(model)
    assert len(list(generate_ids(model, [[1, 2, 3]], 3))) == 3


@pytest.mark.parametrize("extra", [[], ["--quantize", "int4"]])
def test_bench_decode_cli_prints_tokens_per_second_last(tmp_path, capsys, extra, one_thread):
    import re

    from velocis.cli import main
    from velocis.model_io import save_model

    save_model(VelocisModel(tiny()), None, tmp_path / "m")
    assert main(["bench", "decode", "--model", str(tmp_path / "m"), "--new-tokens", "6", "--rounds", "2",
                 *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "C++ decode kernel" in out[1] and ("int4" in out[0]) == bool(extra)
    assert re.fullmatch(r"tokens/s: \d+\.\d", out[-1])


def test_bench_decode_cli_bad_flags_are_one_line(tmp_path, capsys):
    from velocis.cli import main
    from velocis.model_io import save_model

    save_model(VelocisModel(tiny()), None, tmp_path / "m")
    assert main(["bench", "decode", "--model", str(tmp_path / "m"), "--new-tokens", "0"]) == 2
    assert "--new-tokens must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", str(tmp_path / "m"), "--new-tokens", "1000"]) == 2
    assert "context" in capsys.readouterr().err


def test_a_model_made_under_inference_mode_decodes(one_thread):
    with torch.inference_mode():  # inference tensors keep no version counter
        model = VelocisModel(tiny()).eval()
    assert decode_cpu.decode_plan(model) is not None
    assert len(list(generate_ids(model, [[1, 2, 3]], 4))) == 4
