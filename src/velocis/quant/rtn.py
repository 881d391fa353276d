"""Round-to-nearest: every group's scale (and zero point) from its own range, codes rounded."""
from __future__ import annotations

import torch
from torch import nn

from velocis.quant.formats import spec_for
from velocis.quant.linear import quantize_module


@torch.no_grad()
def rtn_quantize(model: nn.Module, q: dict) -> None:
    """Quantize (in place) the modules `q["modules"]` names, one at a time."""
    for name in q["modules"]:
        quantize_module(model, name, spec_for(q, name))
