"""Exporters, one module per target runtime behind the table in :mod:`itera.jobs.export`:
GGUF for llama.cpp (:mod:`itera.export.gguf`), ONNX for onnxruntime (:mod:`itera.export.onnx`),
torch.export and TorchScript (:mod:`itera.export.torchfmt`). Every export is verified in its
runtime before it is renamed into place."""

# Tokens of real text both the source and the export run for verification (``--verify-tokens``);
# here, light, so that the CLI's default and ExportOptions' are this one number.
VERIFY_TOKENS = 128
