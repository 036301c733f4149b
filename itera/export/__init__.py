"""Exporters: GGUF for llama.cpp (:mod:`itera.export.gguf`) and ONNX for onnxruntime
(:mod:`itera.export.onnx`). Every export is verified in its runtime (:mod:`itera.export.verify`)."""
