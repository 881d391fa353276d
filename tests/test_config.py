import pytest

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError


def test_roundtrip_json(tmp_path):
    cfg = get_preset("micro")
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(hidden_dim=100, num_heads=3), "not divisible by num_heads"),
        (dict(hidden_dim=64, num_heads=4, num_kv_heads=3), "must divide num_heads"),
        (dict(mixer="rnn"), "mixer 'rnn' is unknown"),
    ],
)
def test_bad_config_is_clear(kwargs, words):
    with pytest.raises(VelocisError, match=words):
        ModelConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(VelocisError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_hf_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(VelocisError, match="convert --from-hf"):
        ModelConfig.load(tmp_path / "config.json")
