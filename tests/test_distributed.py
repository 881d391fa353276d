"""Training on several processes, for real: ranks launched by torchrun (or by hand, with its
environment variables) on 127.0.0.1 with gloo, one thread each, tiny models.

Equality tests compare a 2-rank run with one process over the same global batch (fp32): the ranks
read disjoint halves of each global batch (data/loader.py) and sum their gradients, so the weights
must match to rounding. Also: `plan` and `checkpoint consolidate` (fast, no processes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from velocis.cli import main

TINY = ["--hidden-dim", "64", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--mlp-dim", "128", "--max-seq-len", "64"]
MOE = ["--num-experts", "4", "--experts-per-token", "2", "--moe-dim", "32"]
# per rank: 2 sequences x 2 micro-batches (gradient accumulation on)
RUN = ["--seq-len", "32", "--device", "cpu", "--precision", "fp32", "--threads", "1", "--eval-batches", "2",
       "--grad-accum", "2", "--lr", "3e-3", "--no-plot", "--log-every", "1", "--eval-every", "100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def cluster_args(data: Path, run: Path, *extra: str) -> list[str]:
    # `--`: torchrun's parser would take --monitor for an abbreviation of its --monitor-interval
    return ["-m", "velocis", "--", "train-cluster", "--preset", "micro", "--data", str(data), "--output-dir",
            str(run), *TINY, *RUN, "--batch-size", "2", "--monitor", "plain", *extra]


def one_process(data: Path, run: Path, *extra: str) -> None:
    """The same run on one process: twice the per-rank batch, the same global batch."""
    n = torch.get_num_threads()
    try:
        assert main(["train-custom", "--data", str(data), "--output-dir", str(run), *TINY, *RUN,
                     "--batch-size", "4", *extra]) == 0
    finally:
        torch.set_num_threads(n)


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory) -> Path:
    """One process, 4 steps, the dense tiny model: what the 2-rank runs must reproduce."""
    run = tmp_path_factory.mktemp("one") / "run"
    one_process(tiny_data_dir, run, "--max-steps", "4", "--save-every", "2")
    return run


# --- fast (default selection) -------------------------------------------------------------------
def test_ddp_two_ranks_equal_one_process_with_grad_accum(tiny_data_dir, reference, tmp_path):
    run = tmp_path / "ddp"
    torchrun(2, cluster_args(tiny_data_dir, run, "--max-steps", "4", "--save-every", "2", "--world-size", "2"))
    assert max_weight_diff(run, reference) < 1e-5
    got, want = losses(run), losses(reference)
    assert list(got) == [1, 2, 3, 4]  # rank 0 alone writes metrics
    assert all(abs(got[s] - want[s]) < 1e-5 for s in want)
    assert (run / "logs" / "rank_1.log").is_file()  # rank 1's output went to its log
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_train_cluster_needs_a_launcher_and_a_matching_world_size(tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = cluster_args(tiny_data_dir, tmp_path / "r", "--max-steps", "1")[3:]
    assert main(args) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err
    assert main(["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(tmp_path / "r2"), *TINY, *RUN,
                 "--max-steps", "1", "--world-size", "4"]) == 2
    assert "world_size (--world-size) 4 needs a launcher" in capsys.readouterr().err


def test_plan_cli(capsys, tmp_path):
    from velocis.config import get_preset
    from velocis.models import VelocisModel

    layout = ["--gpus", "8", "--gpu-memory", "80GB", "--fsdp", "8", "--seq-len", "256", "--global-batch", "64",
              "--json"]
    assert main(["plan", "--preset", "micro", *layout]) == 0
    out = json.loads(capsys.readouterr().out)
    get_preset("micro").save(tmp_path / "config.json")  # --model DIR reads the same shape from its config.json
    assert main(["plan", "--model", str(tmp_path), *layout]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] == out["chosen"]
    with torch.device("meta"):
        n = VelocisModel(get_preset("micro")).num_params()
    chosen = out["chosen"]
    assert chosen["memory"]["parameters"] == pytest.approx(4 * n / 8)  # fp32 master weights sharded over 8
    assert chosen["memory"]["optimizer"] == pytest.approx(8 * n / 8)
    assert chosen["grad_accum"] == 8 and chosen["fits"]
    assert out["best"] and out["best"][0]["mfu"] >= max(p["mfu"] for p in out["best"])

    assert main(["plan", "--preset", "deepseek-v3.2", "--gpus", "128", "--gpu-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "MFU" in text and "optimizer" in text and "activations" in text
    assert "fewest GPUs that fit" in text or "best layouts" in text

    for bad, named in ((["--fsdp", "64"], "--fsdp 64"), (["--ep", "3"], "--ep 3"),
                       (["--gpu-memory", "lots"], "--gpu-memory 'lots'")):
        argv = ["plan", "--preset", "deepseek-v3.2", "--gpus", "128", "--gpu-memory", "80GB", *bad]
        assert main(argv) == 2
        assert named in capsys.readouterr().err


def test_checkpoint_consolidate_cli(tiny_data_dir, tmp_path, capsys):
    """A DCP checkpoint written in this process (DCP needs no process group) -> one model directory."""
    import velocis
    from velocis.config import get_preset
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer
    from velocis.train import sharded_checkpoint

    tok = Tokenizer.load(tiny_data_dir)
    model = VelocisModel(get_preset("micro", hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=128,
                                    vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, tok.vocab_size, (1, 8))).float().sum().backward()  # optimizer state to shard
    opt.step()
    run = tmp_path / "run"
    sharded_checkpoint.save(run, 3, model, opt, tok, {"step": 3})
    assert main(["checkpoint", "consolidate", "--checkpoint", str(run), "--output", str(tmp_path / "m"),
                 "--dtype", "bfloat16"]) == 0
    assert "step_3" in capsys.readouterr().out
    loaded, _ = velocis.load(tmp_path / "m")
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v.cpu().to(torch.bfloat16), want[k].to(torch.bfloat16)), k
    assert load_file(tmp_path / "m" / "model.safetensors")["embed_tokens.weight"].dtype == torch.bfloat16

    # the consolidated dir is a model dir, not a checkpoint
    argv = ["checkpoint", "consolidate", "--checkpoint", str(tmp_path / "m"), "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    assert main(["checkpoint", "consolidate", "--checkpoint", str(tmp_path / "nowhere"), "--output", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_save_cut_short_leaves_the_previous_checkpoint_newest(tiny_data_dir, tmp_path, monkeypatch):
    """Shards go to .step_N.partial, renamed to step_N only once every rank's are down."""
    import torch.distributed.checkpoint as dcp

    from velocis.config import get_preset
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer
    from velocis.train import sharded_checkpoint
    from velocis.train.checkpoint import find_checkpoint, list_checkpoints

    tok = Tokenizer.load(tiny_data_dir)
    model = VelocisModel(get_preset("micro", hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                                    vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    sharded_checkpoint.save(run, 2, model, opt, tok, {"step": 2})
    real_save = dcp.save

    def dies_midway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise RuntimeError("Connection closed by peer")  # a rank lost after this one wrote its shards

    monkeypatch.setattr(dcp, "save", dies_midway)
    with pytest.raises(RuntimeError):
        sharded_checkpoint.save(run, 4, model, opt, tok, {"step": 4})
    assert (run / "checkpoints" / ".step_4.partial").is_dir()
    assert [s for s, _ in list_checkpoints(run)] == [2] and find_checkpoint(run).name == "step_2"
    monkeypatch.setattr(dcp, "save", real_save)
    sharded_checkpoint.save(run, 4, model, opt, tok, {"step": 4})  # the next save clears the leftovers
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]


# --- several processes (marked) --------------------------------------------------------------------
@pytest.mark.distributed
def test_fsdp_equal_and_sharded_checkpoint_resumes_at_world_1_and_2(tiny_data_dir, tmp_path, capsys):
    # FSDP trains with AdamW (Muon needs whole matrices; recipe_for): the one-process run does too
    run, reference = tmp_path / "fsdp", tmp_path / "one"
    one_process(tiny_data_dir, reference, "--max-steps", "4", "--optimizer", "adamw")
    torchrun(2, cluster_args(tiny_data_dir, run, "--max-steps", "4", "--save-every", "2", "--parallel", "fsdp"))
    assert max_weight_diff(run, reference) < 1e-5
    step3 = losses(run)[3]
    # consolidating the last sharded checkpoint gives the model the run wrote at its root
    assert main(["checkpoint", "consolidate", "--checkpoint", str(run), "--output", str(tmp_path / "m")]) == 0
    assert max_weight_diff(tmp_path / "m", run) == 0.0
    # resume from step 2 at world size 1 and 2: the same next-step loss
    for name in ("r1", "r2"):
        shutil.copytree(run, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step_4")
    one_process(tiny_data_dir, tmp_path / "r1", "--max-steps", "4", "--save-every", "2", "--resume",
                "--optimizer", "adamw")
    torchrun(2, cluster_args(tiny_data_dir, tmp_path / "r2", "--max-steps", "4", "--save-every", "2",
                             "--parallel", "fsdp", "--resume"))
    for name in ("r1", "r2"):
        assert losses(tmp_path / name)[3] == pytest.approx(step3, abs=1e-5), name
        assert max_weight_diff(tmp_path / name, run) < 1e-5


EP_LAYER_WORKER = r'''
import copy, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from velocis.config import get_preset
from velocis.models.moe import MoE
from velocis.train.expert_parallel import ExpertParallelExperts

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
P = int(sys.argv[1])  # expert-parallel degree; world // P replicas of each expert shard
torch.manual_seed(0)
cfg = get_preset("micro", hidden_dim=32, num_experts=8, num_experts_per_token=2, moe_dim=16, num_shared_experts=1)
ref = MoE(cfg).train()
ep = copy.deepcopy(ref)
mesh = init_device_mesh("cpu", (world // P, P), mesh_dim_names=("expert_replica", "expert"))
ep.experts = ExpertParallelExperts(ep.experts, mesh["expert"], mesh["expert_replica"].get_group())
x, g = torch.randn(2 * world, 8, 32), torch.randn(2 * world, 8, 32)  # the same on every rank (seeded)
xr = x.clone().requires_grad_()
out_ref, _ = ref(xr)
(out_ref * g).sum().backward()
mine = slice(2 * rank, 2 * rank + 2)
xe = x[mine].clone().requires_grad_()
out, _ = ep(xe)
(out * g[mine]).sum().backward()
def close(a, b, what):
    err = (a - b).abs().max().item()
    assert err < 1e-5, f"rank {rank}: {what} differs by {err}"
close(out, out_ref[mine], "output")
close(xe.grad, xr.grad[mine], "input gradient")
gate = ep.gate.weight.grad.clone(); dist.all_reduce(gate)
close(gate, ref.gate.weight.grad, "router gradient (summed over ranks)")
shared = ep.shared_experts.up_proj.weight.grad.clone(); dist.all_reduce(shared)
close(shared, ref.shared_experts.up_proj.weight.grad, "shared expert gradient")
L, col = cfg.num_experts // P, rank % P  # this rank holds experts col*L .. col*L+L-1
for name in ("gate_up_proj", "down_proj"):  # summed over the replicas already (their hook)
    local = getattr(ep.experts, name).grad.to_local()
    close(local, getattr(ref.experts, name).grad[col * L:(col + 1) * L], f"experts.{name} gradient")
load = ep.last_load.clone(); dist.all_reduce(load)
close(load, ref.last_load, "expert load")
print(f"rank {rank}: expert parallel layer matches")
dist.destroy_process_group()
'''


@pytest.mark.distributed
@pytest.mark.parametrize("ranks,ep", [(2, 2), (4, 2)])
def test_expert_parallel_layer_equals_one_process(tmp_path, ranks, ep):
    """Outputs, input / router / shared-expert / expert gradients and loads; (4, 2): two replicas of
    each expert shard, whose gradients are summed over the replica group."""
    script = tmp_path / "ep_layer.py"
    script.write_text(EP_LAYER_WORKER)
    r = torchrun(ranks, [str(script), str(ep)])
    assert "rank 0: expert parallel layer matches" in r.stdout


@pytest.mark.distributed
def test_expert_parallel_training_equals_one_process(tiny_data_dir, tmp_path):
    """FSDP + EP 2 against one process; aux-loss-free balancing (its load counts are summed over the
    ranks before the bias step). An aux loss is computed over each rank's micro-batch, as Megatron
    does, so it differs from one process's over the whole global batch."""
    moe = [*MOE, "--balance", "aux_free"]
    torchrun(2, cluster_args(tiny_data_dir, tmp_path / "ep", "--max-steps", "3", *moe, "--parallel", "fsdp",
                             "--expert-parallel", "2"))
    one_process(tiny_data_dir, tmp_path / "one", "--max-steps", "3", *moe, "--optimizer", "adamw")  # as FSDP
    assert max_weight_diff(tmp_path / "ep", tmp_path / "one") < 1e-5


@pytest.mark.distributed
def test_small_moe_shape_trains_with_expert_parallel(tiny_data_dir, tmp_path):
    """The `small` preset's MoE (512 wide, 8 experts of 1040, top-2, aux loss) in 2 of its 8 layers."""
    run = tmp_path / "small"
    args = ["-m", "velocis", "--", "train-cluster", "--preset", "small", "--num-layers", "2", "--max-seq-len", "64",
            "--data", str(tiny_data_dir), "--output-dir", str(run), *RUN, "--batch-size", "2", "--max-steps", "3",
            "--parallel", "fsdp", "--expert-parallel", "2"]
    r = torchrun(2, args, timeout=600)
    assert "expert parallel 2" in r.stdout
    got = losses(run)
    assert list(got) == [1, 2, 3] and all(5 < v < 7 for v in got.values())  # ~ln(512) from the start
    config = json.loads((run / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_token"], config["moe_dim"]) == (8, 2, 1040)
    assert load_file(run / "model.safetensors")["layers.0.feed_forward.experts.gate_up_proj"].shape == (8, 2080, 512)


@pytest.mark.distributed
def test_two_nodes_on_one_machine(tiny_data_dir, reference, tmp_path):
    """Two torchrun launches (--nnodes 2, one process each) meeting at a c10d rendezvous."""
    run = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "velocis-test",
           *cluster_args(tiny_data_dir, run, "--max-steps", "4", "--save-every", "2", "--world-size", "2")]
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[-2000:] for o in outputs]
    assert max_weight_diff(run, reference) < 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_lost_rank_stops_the_other_with_a_clear_error_and_the_last_checkpoint_resumes(tiny_data_dir, tmp_path, sig):
    """Ranks started by hand with torchrun's variables; once checkpoints exist rank 1 is SIGKILLed
    (its connections close: the other rank stops at once) or SIGSTOPped (it hangs: the other rank
    stops when --dist-timeout runs out)."""
    run, timeout = tmp_path / "run", 10
    port = str(free_port())
    args = [sys.executable, *cluster_args(tiny_data_dir, run, "--max-steps", "100000", "--save-every", "2",
                                          "--dist-timeout", str(timeout))]
    args.remove("--")
    procs = []
    for rank in (0, 1):
        e = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_6").is_dir():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint was written"
            time.sleep(0.2)
        procs[1].send_signal(sig)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    print(f"rank 0 stopped {waited:.1f}s after rank 1 got {sig.name}: {err.strip().splitlines()[-1]}")
    assert procs[0].returncode == 2, err[-2000:]
    assert "lost contact with the other ranks" in err and "--resume" in err, err[-2000:]
    assert waited < timeout + 10
    # the newest complete checkpoint resumes (a save cut short left no step dir, only a .partial)
    from velocis.train.checkpoint import list_checkpoints

    last = list_checkpoints(run)[-1][0]
    assert last >= 6
    one_process(tiny_data_dir, run, "--max-steps", str(last + 1), "--save-every", "2", "--resume")
    assert max(losses(run)) == last + 1
