"""Exporters, one module per target runtime behind the typed table :data:`itera.export.formats.FORMATS`:
GGUF for llama.cpp (:mod:`itera.export.gguf`), ONNX for onnxruntime (:mod:`itera.export.onnx`),
torch.export and TorchScript (:mod:`itera.export.torchfmt`), the traced graph they share
(:mod:`itera.export.trace`) and the checks every file passes (:mod:`itera.export.verify`). The job
(:mod:`itera.jobs.export`) verifies every export in its runtime before it is renamed into place.
Tensor types and names come from the storage layer (:mod:`itera.storage`), never from quantization."""

# Tokens of real text both the source and the export run for verification (``--verify-tokens``);
# here, light, so that the CLI's default and ExportOptions' are this one number.
VERIFY_TOKENS = 128
