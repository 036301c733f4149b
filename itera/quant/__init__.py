"""Weight quantization: round-to-nearest, GPTQ and measured mixed precision (``itera quantize``).

:mod:`itera.quant.formats` defines the on-disk layout and the one dequantization rule that the
loader, the exporters and the quantizers all share.
"""
