"""itera: distill, quantize, export, evaluate and version small Llama-family language models.

The library computes and raises typed errors (:mod:`itera.errors`); the CLI in
``itera.cli`` parses options and prints records. Heavy packages (torch,
onnxruntime, llama_cpp) are imported inside the functions that need them so that
``itera --help`` starts fast.
"""

__version__ = "0.1.0"
