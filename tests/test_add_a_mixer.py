"""docs/INTERFACES.md's "add a mixer" walkthrough, followed for real: a mixer with a fixed-size
recurrent state (a causal running mean of projected tokens) registered from outside Velocis, then
trained, decoded with its state cache, packed, and refused where a state cannot roll back. Plus a
check that the contract the doc states is the code's."""
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.generate import generate_ids
from velocis.models import MIXERS, VelocisModel
from velocis.models.cache import LayerCache
from velocis.models.mixer import Mixer
from velocis.models.positions import Positions
from velocis.models.registry import register_mixer

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = Path(__file__).parents[1] / "docs" / "INTERFACES.md"


class MeanState(LayerCache):
    kind = "state"

    def __init__(self, batch_size, dim, device=None, dtype=torch.float32):
        super().__init__(max_len=0)
        self.register_buffer("total", torch.zeros(batch_size, dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer("count", torch.zeros(batch_size, 1, device=device, dtype=dtype), persistent=False)

    def reset(self, rows):
        self.total[rows] = 0
        self.count[rows] = 0


@register_mixer("running_mean")
class RunningMean(Mixer):
    """y_t = out(mean of v(x_s) over s <= t within the document): a toy recurrent mixer."""

    cache_kind = "state"

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.v = nn.Linear(config.hidden_dim, config.hidden_dim, bias=False)
        self.out = nn.Linear(config.hidden_dim, config.hidden_dim, bias=False)
        self.init_std = config.init_std
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.v.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.init_std)

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.float32):
        return MeanState(batch_size, self.v.out_features, device, dtype)

    def cache_bytes_per_sequence(self, dtype_bytes=2):
        return (self.v.out_features + 1) * dtype_bytes

    def forward(self, x, pos, cache=None):
        pos = Positions.of(pos)
        v = self.v(x)
        if pos.doc_ids is not None:  # packed: restart the sum at every document start
            starts = (pos.ids == 0).float().unsqueeze(-1)
            seg = torch.cumsum(starts, 1)
            total = torch.zeros_like(v)
            for d in range(int(seg.max())):  # small test mixer: a loop over documents is fine
                m = (seg == d + 1).float()
                total = total + torch.cumsum(v * m, 1) * m
            count = (pos.ids + 1).float().unsqueeze(-1)
        else:
            total = torch.cumsum(v, 1)
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=v.dtype)[None, :, None]
            if cache is not None:
                total = total + cache.total[:, None]
                count = count + cache.count[:, None]
                cache.total.copy_(total[:, -1])
                cache.count.copy_(count[:, -1].expand_as(cache.count))
        return self.out(total / count)


def cfg(**kw):
    base = dict(vocab_size=61, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64, max_seq_len=64,
                layer_mixers=["running_mean", "attention"], init_std=0.2)
    return ModelConfig(**{**base, **kw})


def test_registered_mixer_is_known_everywhere():
    assert "running_mean" in MIXERS
    from velocis.commands.train import add_shape_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_shape_arguments(p)
    assert "running_mean" in p.parse_args(["--mixer", "running_mean"]).mixer
    with torch.device("meta"):
        m = VelocisModel(cfg())
    assert m.cache_bytes(2) == (2 * 2 * 16 * 2, (32 + 1) * 2)  # attention per token, the state per sequence


def test_trains_decodes_and_packs():
    torch.manual_seed(0)
    model = VelocisModel(cfg())
    x = torch.randint(0, 61, (2, 12))
    out = model(x, torch.roll(x, -1, 1))
    out.loss.backward()
    assert model.layers[0].mixer.v.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 12)], 1)
        assert (steps - model(x)).abs().max() < 1e-5  # the state cache == the full forward
        a, b = x[:1, :5], x[:1, 5:]
        packed = model(x[:1], positions=torch.cat([torch.arange(5), torch.arange(7)])[None])
        assert (packed - torch.cat([model(a), model(b)], 1)).abs().max() < 1e-5
    alone = torch.stack(list(generate_ids(model, [[1, 2, 3]], 4)), 1)
    assert torch.equal(alone, torch.stack(list(generate_ids(model, [[1, 2, 3]], 4, recompute=True)), 1))
    with pytest.raises(VelocisError, match="different lengths"):
        list(generate_ids(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 4))
    cache = model.new_cache(1, 16)
    model(x[:1, :6], cache=cache)
    with pytest.raises(VelocisError, match="cannot roll back"):  # a state needs saved checkpoints to undo
        cache.rollback(4)
    cache.reset()
    assert cache.lengths.tolist() == [0] and model.layers[0].mixer.v.weight.shape == (32, 32)


def test_the_documented_forward_is_the_code():
    doc = DOC.read_text(encoding="utf-8")
    sig = inspect.signature(VelocisModel.forward)
    documented = re.search(r"`model\((input_ids.*?)\)`", doc, re.S).group(1).replace("\n", " ")
    names = [p.split("=")[0].strip(" *") for p in documented.split(",")]
    assert [n for n in names if n] == [n for n in sig.parameters if n != "self"]
    for path in set(re.findall(r"`((?:models|train|kernels|infer|interop)/[\w/]+\.py)", doc)):
        assert (Path(__import__("velocis").__file__).parent / path).is_file(), path
