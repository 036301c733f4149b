"""Weight quantization (``itera quantize``): the on-disk layout and its one dequantization rule
(:mod:`itera.quant.formats`), GPTQ (:mod:`itera.quant.gptq`), layer-by-layer application
(:mod:`itera.quant.layerwise`), measured mixed precision (:mod:`itera.quant.plan`), and the
recipe (:mod:`itera.jobs.quantize`)."""
