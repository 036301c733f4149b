"""Chat prompts: the model's own chat template, rendered as transformers renders it.

Where the template comes from, by artifact:

- a checkpoint directory: ``chat_template.jinja`` (transformers >= 4.43 writes it), else
  ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of which
  ``default`` is used);
- a ``.gguf`` file: the ``tokenizer.chat_template`` key (llama.cpp's convention);
- an ``.onnx`` file from ``itera export``: the ``chat_template`` of the tokenizer config embedded
  in its metadata;
- or the operator's ``--chat-template FILE``, which replaces the model's.

A model without one gets no invented format: ``/v1/chat/completions`` answers 400 and says so
(the choice of transformers >= 4.44 and vLLM; a guessed template makes a model trained without it
produce text it was never trained on). ``/v1/completions`` works for every model.

Templates are untrusted code from a model file: they run in Jinja's immutable sandbox with the
variables and helpers transformers gives them (``messages``, ``bos_token``, ``eos_token``,
``add_generation_prompt``, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not
escape HTML).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from itera.errors import InputError


class ChatTemplateError(InputError):
    """A template that does not compile, or refuses the messages (``raise_exception``)."""


def _pick(template) -> str | None:
    if isinstance(template, str) and template.strip():
        return template
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        for t in template:
            if isinstance(t, dict) and t.get("name") == "default" and isinstance(t.get("template"), str):
                return t["template"]
    return None


def _from_config_text(text: str | None) -> str | None:
    if not text:
        return None
    try:
        cfg = json.loads(text)
    except ValueError:
        return None
    return _pick(cfg.get("chat_template")) if isinstance(cfg, dict) else None


def model_template(runtime, path: Path, fmt: str) -> str | None:
    """The chat template an artifact carries, or None."""
    path = Path(path)
    if fmt == "gguf":
        return _pick(runtime.llm.metadata.get("tokenizer.chat_template"))
    if fmt == "onnx":
        meta = runtime.session.get_modelmeta().custom_metadata_map
        return _from_config_text(meta.get("itera.tokenizer_config.json"))
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return _pick(jinja.read_text("utf-8"))
    cfg = path / "tokenizer_config.json"
    return _from_config_text(cfg.read_text("utf-8")) if cfg.is_file() else None


def token_text(tokenizer, token_id: int | None) -> str:
    """The text of a special token (``<s>``) for the template's ``bos_token``/``eos_token``."""
    if token_id is None:
        return ""
    if hasattr(tokenizer, "backend"):  # itera.tokenizer.Tokenizer (the `tokenizers` library)
        return tokenizer.backend.id_to_token(token_id) or ""
    return tokenizer.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")  # llama.cpp


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Ids of a rendered chat prompt. Special tokens written in it (``<|im_start|>``, ``<s>``) are
    parsed as the special tokens they name, as transformers does; BOS is put in front when the
    tokenizer adds one and the template did not already write it."""
    import inspect

    if "special" in inspect.signature(tokenizer.encode).parameters:
        ids = tokenizer.encode(text, add_bos=False, special=True)
    elif hasattr(tokenizer, "backend"):  # the `tokenizers` library matches added tokens in text
        ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
    else:  # llama.cpp
        ids = tokenizer.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


class ChatTemplate:
    """A compiled template; ``render(messages)`` gives the prompt text, generation prompt included."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "the model"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template of {origin} does not compile: {e}") from None
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages`` ([{"role", "content"}]); ChatTemplateError when the
        template refuses them."""
        import jinja2

        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=True)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(), sandbox refusals, undefined calls
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on the messages ({type(e).__name__}: {e})") from None
