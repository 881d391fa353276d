"""`velocis params --preset deepseek-v3 / deepseek-v3.2`: exact parameter figures on the meta device.

DeepSeek publishes 671B total (main model), 37B activated per token, and 685B on Hugging Face =
671B main + 14B MTP. Computed here:
  main model                  671,026,404,352   (671.03B)  -> the published 671B
  MTP module (own weights)     11,610,067,968   (11.61B): one MLA+MoE block 11.51B + eh_proj 0.10B + 2 norms
  + its copies of embedding and head (2 x 926,679,040) = 13.46B; DeepSeek's "14B" is 685 - 671;
    HF checkpoint weights 684,489,830,400 (684.49B); the "685B" HF shows also counts the FP8 block
    scales (weight_scale_inv, one fp32 per 128x128 block of every FP8 linear: ~41.5M) -> 684.53B.
  activated per token          36,625,603,584   (36.63B) without the embedding lookup (head included);
                               37,552,282,624   (37.55B) with it -> the published "37B"
"""
from velocis.cli import main
from velocis.config import get_preset
from velocis.models.cache_size import mtp_split
from velocis.models.count import count_params


def test_deepseek_v3_published_sizes():
    cfg = get_preset("deepseek-v3")
    c = count_params(cfg)
    s = mtp_split(cfg)
    assert s["main_total"] == 671_026_404_352
    assert s["mtp"] == 11_610_067_968
    assert c["total"] == s["main_total"] + s["mtp"] == 682_636_472_320
    emb = 129280 * 7168
    assert c["parts"]["embedding"] == c["parts"]["head"] == emb
    assert s["hf_checkpoint_total"] == 684_489_830_400 == s["main_total"] + s["mtp"] + 2 * emb
    assert c["active"] == 36_625_603_584
    assert c["active"] + emb == 37_552_282_624
    # the MTP block's own active parameters: attention + 8 routed + 1 shared expert + router + eh_proj + norms
    assert s["mtp_active"] == 187_107_328 + 9 * 3 * 7168 * 2048 + 256 * 7168 + 2 * 7168 * 7168 + 5 * 7168 == 688_100_352
    # round figures DeepSeek publishes
    assert round(s["main_total"] / 1e9) == 671 and round(s["hf_checkpoint_total"] / 1e9) == 684
    assert round(c["active"] / 1e9) == 37
    blocks = lambda o, i: -(-o // 128) * -(-i // 128)  # noqa: E731  FP8 128x128 scale blocks
    att = blocks(1536, 7168) + blocks(128 * 192, 1536) + blocks(576, 7168) + blocks(128 * 256, 512) + blocks(7168, 16384)
    scales = 62 * att + 3 * (2 * blocks(18432, 7168) + blocks(7168, 18432)) + 59 * 257 * (
        2 * blocks(2048, 7168) + blocks(7168, 2048))
    assert round((s["hf_checkpoint_total"] + scales) / 1e9) == 685
    assert c["kv_cache_bytes_per_token"] == 61 * 576 * 2


def test_deepseek_v32_adds_the_indexer():
    v3, v32 = count_params(get_preset("deepseek-v3")), count_params(get_preset("deepseek-v3.2"))
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64  # wq_b, wk, k_norm (w, b), weights_proj
    assert v32["total"] - v3["total"] == 62 * per_layer  # 61 layers + the MTP block
    assert v32["kv_cache_bytes_per_token"] == 61 * (576 + 128) * 2


def test_params_cli_deepseek(capsys):
    assert main(["params", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "682,636,472,320" in out and "36,625,603,584" in out
    assert "without MTP: 671,026,404,352" in out
    assert "MHA, 128 heads x 56" in out and "(1/24.9)" in out
