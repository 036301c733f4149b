"""Weight quantization algorithms, the components of ``itera quantize`` (:mod:`itera.jobs.quantize`):
GPTQ (:mod:`itera.quant.gptq`), layer-by-layer application (:mod:`itera.quant.layerwise`),
measured mixed precision (:mod:`itera.quant.plan`, :mod:`itera.quant.budget`) and llama.cpp-style
importance data (:mod:`itera.quant.importance`). What they produce is stored in the types of the
storage layer (:mod:`itera.storage`); nothing here imports an exporter or a runtime."""
