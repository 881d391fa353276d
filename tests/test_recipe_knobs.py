"""Training-recipe knobs of the model config (issue 19's ablations)."""
from __future__ import annotations

import pytest
import torch

from velocis.config import get_preset
from velocis.models import VelocisModel


def test_zero_init_residual_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    cfg = get_preset("micro", num_layers=2, zero_init_residual=True)
    for model in (VelocisModel(cfg), None):
        if model is None:  # the trainer's path: built on meta, materialised, initialised
            with torch.device("meta"):
                model = VelocisModel(cfg)
            model.to_empty(device="cpu")
            model.init_weights()
        zeroed = [n for n, p in model.named_parameters() if not p.any()]
        assert sorted(zeroed) == sorted(f"layers.{i}.{part}.weight" for i in range(2)
                                        for part in ("mixer.o_proj", "feed_forward.down_proj"))
        x = torch.randint(0, cfg.vocab_size, (1, 8))
        h = model(x, return_hidden=True).hidden
        assert torch.equal(h, model.embed_tokens(x))  # blocks add nothing yet
    plain = VelocisModel(get_preset("micro", num_layers=2))
    assert all(p.any() for p in plain.parameters())


def test_relu2_feed_forward_is_down_of_squared_relu_and_refused_by_hf_export(tmp_path):
    from velocis.errors import VelocisError
    from velocis.interop.hf import export_hf
    from velocis.models.count import count_params

    cfg = get_preset("micro", num_layers=2, dense_feed_forward="relu2", mlp_dim=384)
    model = VelocisModel(cfg)
    ff = model.layers[0].feed_forward
    x = torch.randn(2, 5, cfg.hidden_dim)
    want = torch.relu(x @ ff.up_proj.weight.T).square() @ ff.down_proj.weight.T
    assert torch.allclose(ff(x), want, atol=1e-5)
    swiglu = count_params(get_preset("micro", num_layers=2, mlp_dim=256))["total"]
    assert count_params(cfg)["total"] == swiglu  # 1.5x the width, the same parameters
    with pytest.raises(VelocisError):
        export_hf(model, None, tmp_path / "hf")


def test_train_commands_start_from_the_measured_recipe_and_keep_adamw_under_fsdp():
    """train / train-custom take the preset's recipe (Muon + WSD) for what the user leaves out;
    FSDP (which shards matrices by rows) gets AdamW; the user's flags win."""
    from velocis.cli import build_parser
    from velocis.commands.train import train_config_for
    from velocis.train.config import PRESET_RECIPES

    parser = build_parser()
    model_config = get_preset("micro")

    def cfg(*argv):
        return train_config_for(parser.parse_args(list(argv)), "out", "data", model_config)

    default = cfg("train-custom")
    assert (default.optimizer, default.schedule, default.lr, default.batch_size) == (
        "muon", "wsd", PRESET_RECIPES["custom"]["lr"], PRESET_RECIPES["custom"]["batch_size"])
    assert cfg("train-micro").optimizer == "muon"
    assert cfg("train-custom", "--preset", "small").lr == PRESET_RECIPES["small"]["lr"]
    assert cfg("train-custom", "--parallel", "fsdp").optimizer == "adamw"
    given = cfg("train-custom", "--optimizer", "adamw", "--schedule", "cosine", "--lr", "1e-3")
    assert (given.optimizer, given.schedule, given.lr) == ("adamw", "cosine", 1e-3)
    from velocis.train.config import TrainConfig

    assert TrainConfig().optimizer == "adamw"  # fine-tuning (sft, dpo, rl) keeps AdamW
