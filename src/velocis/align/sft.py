"""SFTObjective: next-token loss on the assistant tokens of packed conversations (align/chat_data.py).

A batch is (input_ids, targets, positions) [B, T]; targets are -100 everywhere but the assistant
replies, and the positions restart at each conversation, so the model attends within it. The loss is
the summed NLL of this micro-batch's scored tokens divided by the scored tokens of the whole
optimizer step (`num_tokens`, summed by the trainer over its micro-batches): every assistant token
weighs the same whatever row or micro-batch it falls in, and a short reply packed beside a long one
is not drowned out nor blown up (the mean-per-row normalisation's bias).
"""
from __future__ import annotations

from velocis.train.objectives import IGNORE_INDEX, Objective


class SFTObjective(Objective):
    name = "sft"

    def num_tokens(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def __call__(self, model, batch, num_tokens):
        input_ids, targets, positions = batch
        out = model(input_ids, targets, positions=positions, reduction="sum", ignore_index=IGNORE_INDEX)
        share = out.num_tokens / num_tokens  # auxiliary losses (MoE balance, MTP) weigh by this micro-batch's share
        stats = {**out.stats, "assistant_tokens": out.num_tokens}
        return out.lm_loss / num_tokens + out.aux_loss * share, stats

    def evaluate(self, model, batch) -> tuple[float, int]:
        """Summed NLL over the batch's assistant tokens, and their count."""
        input_ids, targets, positions = batch
        out = model(input_ids, targets, positions=positions, reduction="sum", ignore_index=IGNORE_INDEX)
        return float(out.lm_loss), int(out.num_tokens)
