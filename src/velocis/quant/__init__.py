"""Weight-only quantization: int8 / int4 block formats, round-to-nearest and GPTQ, quantized modules.

    velocis quantize --model DIR --bits 4 --group-size 32 [--method gptq --calibration text.txt] --output OUT

    from velocis.quant import quantize_model
    qmodel = quantize_model(model, bits=4, group_size=32)                  # in place, returns the model
    qmodel = quantize_model(model, bits=4, method="gptq", calibration=ids)  # ids: LongTensor [N, T]

Files:
  formats.py  the tensor layout (qweight, scales, zeros), quantize / pack / dequantize, config checks
  linear.py   Int8Linear, Int4Linear, QuantExperts: the plain-PyTorch reference forward
  swap.py     which modules are quantized, and building them (on the meta device) for a checkpoint
  rtn.py      round-to-nearest;  gptq.py: GPTQ with calibration data
The checkpoint is an ordinary Velocis model directory whose config.json has `quantization`;
velocis.load (model_io.load_model_dir) builds the quantized modules before the weights load.
"""
from velocis.quant.formats import QSpec, QTensor, dequantize, pack_int4, quantize_rtn, unpack_int4
from velocis.quant.linear import Int4Linear, Int8Linear, QuantExperts, QuantLinear

__all__ = ["QSpec", "QTensor", "dequantize", "pack_int4", "quantize_rtn", "unpack_int4", "Int4Linear",
           "Int8Linear", "QuantExperts", "QuantLinear", "quantize_model"]


def quantize_model(model, bits: int = 4, group_size: int | None = 32, symmetric: bool | None = None,
                   method: str = "rtn", calibration=None, **gptq_options):
    """Quantize `model` in place (see velocis.quant.swap.quantize_model) and return it."""
    from velocis.quant.swap import quantize_model as _quantize

    return _quantize(model, bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                     calibration=calibration, **gptq_options)
