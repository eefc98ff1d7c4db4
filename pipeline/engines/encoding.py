"""How each serving engine turns a chat into token ids, reproduced with the engines' own parts.

- transformers: `apply_chat_template` of the saved tokenizer.
- TGI (router 3.x): the `chat_template` from tokenizer_config.json rendered by minijinja (the same
  Rust engine TGI embeds) with the variables TGI passes, then tokenized by the `tokenizers` library
  from tokenizer.json with add_special_tokens=False (../shared/notes/serving.md).
- llama-cpp-python: the GGUF's `tokenizer.chat_template` rendered by llama-cpp-python's Jinja2
  formatter (Python's jinja2, not llama.cpp's C++ engine), then tokenized by llama.cpp from the GGUF
  with special tokens parsed and no BOS added, which is what `Llama.create_chat_completion` does.
- llama-server: llama.cpp's own server, live over HTTP (`LlamaServerEngine`).
Each returns token ids, or raises `TemplateRefused` when the template refuses the dialog.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from pipeline.run.errors import DataError


class TemplateRefused(ValueError):
    """The chat template raised (for example on turn-boundary text inside a message)."""


def _tokenizer_config(hf_dir: Path) -> dict:
    return json.loads((Path(hf_dir) / "tokenizer_config.json").read_text())


class TransformersEngine:
    name = "transformers"

    def __init__(self, hf_dir: Path):
        from pipeline.chat.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(hf_dir)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception as err:  # jinja2's TemplateError from raise_exception
            raise TemplateRefused(str(err)) from err
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class TGIEngine:
    """TGI's chat path, offline: minijinja render + `tokenizers` encode."""

    name = "tgi"

    def __init__(self, hf_dir: Path):
        from tokenizers import Tokenizer

        config = _tokenizer_config(hf_dir)
        if not isinstance(config.get("chat_template"), str):
            raise DataError(
                f"{hf_dir}/tokenizer_config.json has no chat_template: TGI would refuse chat requests"
            )
        self.template = config["chat_template"]
        self.bos_token, self.eos_token = config["bos_token"], config["eos_token"]
        self.tokenizer = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))

    @cached_property
    def environment(self):
        import minijinja

        def raise_exception(message):
            raise minijinja.TemplateError(message)

        env = minijinja.Environment(pycompat=True)  # TGI installs the pycompat unknown-method callback
        env.add_function("raise_exception", raise_exception)
        env.add_function("strftime_now", lambda fmt: datetime.now().strftime(fmt))
        env.add_template("chat", self.template)
        return env

    def render(self, messages: list[dict]) -> str:
        import minijinja

        try:
            return self.environment.render_template(
                "chat",
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=True,
                tools=None,
            )
        except minijinja.TemplateError as err:
            raise TemplateRefused(str(err)) from err

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.text_ids(self.render(messages))

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


class LlamaCppEngine:
    """llama-cpp-python's chat path: the GGUF's template, its Jinja2 formatter, llama.cpp's tokenizer."""

    name = "llama-cpp-python"

    def __init__(self, gguf: Path, llama=None):
        from pipeline.engines.gguf import open_llama

        self.llama = llama or open_llama(gguf, vocab_only=True)
        metadata = self.llama.metadata
        if "tokenizer.chat_template" not in metadata:
            raise DataError(
                f"{gguf}: no tokenizer.chat_template: llama.cpp would fall back to its own layout"
            )
        self.template = metadata["tokenizer.chat_template"]

    @cached_property
    def formatter(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab = self.llama
        return Jinja2ChatFormatter(
            template=self.template,
            bos_token=vocab.detokenize([vocab.token_bos()], special=True).decode(),
            eos_token=vocab.detokenize([vocab.token_eos()], special=True).decode(),
        )

    def render(self, messages: list[dict]) -> str:
        try:
            return self.formatter(messages=messages).prompt
        except Exception as err:  # jinja2 raises what raise_exception raised: a ValueError
            raise TemplateRefused(str(err)) from err

    def chat_ids(self, messages: list[dict]) -> list[int]:
        # create_chat_completion: the formatter says the text holds its special tokens, so
        # add_bos=False and special=True.
        return self.llama.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)

    def text_ids(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)


class LlamaCppBuiltinEngine(LlamaCppEngine):
    """llama.cpp's built-in chat formats through its C API, `llama_chat_apply_template` (what
    `llama-server --no-jinja` and `--chat-template <name>` use): llama.cpp picks a hand-written layout by
    looking at the template's text and never runs it. Measured, not trusted: it is not Meta's layout."""

    name = "llama_chat_apply_template"

    def render(self, messages: list[dict]) -> str:
        import ctypes

        import llama_cpp

        chat = (llama_cpp.llama_chat_message * len(messages))()
        encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]  # kept alive for the call
        for slot, (role, content) in zip(chat, encoded):
            slot.role, slot.content = role, content
        size = 1 << 20
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(
            self.template.encode(), chat, len(messages), True, buffer, size
        )
        if n < 0 or n > size:
            raise TemplateRefused(f"llama_chat_apply_template returned {n}")
        return buffer.raw[:n].decode("utf-8")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        # The server tokenizes the built-in layout with BOS added and special tokens parsed.
        return self.llama.tokenize(self.render(messages).encode("utf-8"), add_bos=True, special=True)


class LlamaServerEngine:
    """llama.cpp's own `llama-server`, live: `/apply-template` renders the chat with the GGUF's template
    in llama.cpp's C++ Jinja engine, and `/tokenize` with `add_special` and `parse_special` tokenizes it
    as `/v1/chat/completions` does (llama.cpp drops the rendered leading BOS and adds it back as the
    vocabulary's `add_bos_token` says)."""

    def __init__(self, base_url: str, name: str = "llama-server"):
        self.base_url, self.name = base_url, name

    def render(self, messages: list[dict]) -> str:
        import urllib.error

        from pipeline.engines.serving import http_json

        try:
            return http_json(f"{self.base_url}/apply-template", {"messages": messages})["prompt"]
        except urllib.error.HTTPError as err:  # the template raised: a 4xx/5xx carrying its message
            raise TemplateRefused(f"HTTP {err.code}: {err.read().decode(errors='replace')[:300]}") from err

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenize(self.render(messages), add_special=True, parse_special=True)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=False, parse_special=False)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        from pipeline.engines.serving import http_json

        body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        return http_json(f"{self.base_url}/tokenize", body)["tokens"]


class VLLMEngine:
    """vLLM, live: `/tokenize` with `messages` renders the chat with the model directory's own
    `chat_template` and tokenizes it exactly as `/v1/chat/completions` does (the template emits BOS;
    vLLM's chat path adds none)."""

    name = "vllm"

    def __init__(self, base_url: str):
        self.base_url = base_url

    def chat_ids(self, messages: list[dict]) -> list[int]:
        import urllib.error

        from pipeline.engines.serving import http_json

        body = {"model": "model", "messages": messages, "add_generation_prompt": True}
        try:
            return http_json(f"{self.base_url}/tokenize", body)["tokens"]
        except urllib.error.HTTPError as err:  # the template raised: HTTP 400 with its message
            raise TemplateRefused(f"HTTP {err.code}: {err.read().decode(errors='replace')[:300]}") from err

    def text_ids(self, text: str) -> list[int]:
        from pipeline.engines.serving import http_json

        body = {"model": "model", "prompt": text, "add_special_tokens": False}
        return http_json(f"{self.base_url}/tokenize", body)["tokens"]
