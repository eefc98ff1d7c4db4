"""The Llama-2 chat format: the one place it is written.

Meta's reference (`llama/generation.py`, `Llama.chat_completion`) builds a dialog as token ids,
not as a string: every finished exchange is encoded on its own and wrapped in BOS ... EOS, and the
open turn at the end gets BOS and no EOS. `encode_dialog` reproduces exactly that.
`LLAMA2_CHAT_TEMPLATE` renders the same thing as text for the serving engines (transformers,
TGI, llama.cpp), which then tokenize it with special tokens parsed and no BOS added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Meta's SPECIAL_TAGS: Llama-2 has no control tokens for turn boundaries, so these strings typed
# in a message would tokenize exactly like a real boundary. Meta refuses such dialogs; so do we.
TURN_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
# Text of the BOS/EOS control tokens. `encode_dialog` encodes it as plain text, but the engines
# parse special tokens in templated text, so the template refuses it instead of forging a turn.
CONTROL_TOKEN_TEXT = ("<s>", "</s>", "<unk>")

ROLES = ("system", "user", "assistant")

# Python's str.strip() removes exactly these characters (Meta strips with it). Jinja's bare `trim`
# strips a different set in each engine (minijinja's Rust trim keeps \x1c-\x1f, llama.cpp's C
# isspace() keeps them and all non-ASCII whitespace), so the template spells the set out.
PY_WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
ASCII_WHITESPACE = "".join(c for c in PY_WHITESPACE if c.isascii())  # \t \n \v \f \r, \x1c-\x1f, space
WIDE_WHITESPACE = "".join(c for c in PY_WHITESPACE if not c.isascii())  # \x85, \xa0, \u2000-\u200a, ...

# Every engine must read the template's string literals alike, and they do not:
# - llama.cpp's own Jinja lexer (common/jinja, llama-server's default) knows only the escapes
#   \n \t \r \b \f \v \\ \' \" and refuses any other (a `\u` escape stops the server loading);
#   it also turns a raw \r in the template text into \n.
# - minijinja (TGI) keeps `\v` as backslash + v.
# So \t \n \r are written as escapes, every other character raw (UTF-8 for the wide ones).
_JINJA_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "'": "\\'", "\\": "\\\\"}


def _jinja_string(text: str) -> str:
    return "'" + "".join(_JINJA_ESCAPES.get(c, c) for c in text) + "'"


_ASCII_TRIM = "trim(" + _jinja_string(ASCII_WHITESPACE) + ")"
_WIDE = _jinja_string(WIDE_WHITESPACE)
_WIDE_LIST = "[" + ", ".join(_jinja_string(c) for c in WIDE_WHITESPACE) + "]"
_REFUSED_TEXT = ", ".join(f"'{tag}'" for tag in TURN_TAGS + CONTROL_TOKEN_TEXT)

# `text.value`: the turn's text (the system block folded into the first) stripped as str.strip() does,
# the same in every engine. `trim(chars)` strips the ASCII whitespace: llama.cpp
# strips byte by byte, which is right for ASCII but would cut UTF-8 apart for a wide character
# (a message ending in "é" would lose a byte). The wide characters are therefore removed one
# whole character at a time with endswith/startswith and a slice as long as the character: each
# engine counts `length` in the unit it slices in (bytes in llama.cpp, characters elsewhere).
# The loop runs only for text whose first or last unit may belong to a wide character, and stops
# as soon as a pass removes nothing (engines differ on `break`, so a flag ends it).
_STRIP_CONTENT = (
    "{%- set text = namespace(value=((system if loop.first else '') + message['content']) | "
    + _ASCII_TRIM
    + ", done=false) -%}\n"
    "{%- if text.value[:1] in " + _WIDE + " or text.value[-1:] in " + _WIDE + " -%}\n"
    "{%- for _ in range(text.value | length) -%}"
    "{%- if not text.done -%}"
    "{%- set text.done = true -%}"
    "{%- for wide in " + _WIDE_LIST + " -%}"
    "{%- if text.value.endswith(wide) -%}"
    "{%- set text.value = text.value[:(text.value | length) - (wide | length)] | " + _ASCII_TRIM + " -%}"
    "{%- set text.done = false -%}"
    "{%- endif -%}"
    "{%- if text.value.startswith(wide) -%}"
    "{%- set text.value = text.value[wide | length:] | " + _ASCII_TRIM + " -%}"
    "{%- set text.done = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
)

# One line per Jinja statement, every tag whitespace-trimmed: engines render it with different
# whitespace settings (transformers and llama-cpp-python: trim_blocks + lstrip_blocks; TGI's
# minijinja and llama.cpp: neither), so the template must not depend on them.
LLAMA2_CHAT_TEMPLATE = (
    "{%- set has_system = messages | length > 0 and messages[0]['role'] == 'system' -%}\n"
    "{%- set system = ('<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n')"
    " if has_system else '' -%}\n"
    "{%- set dialog = messages[1:] if has_system else messages -%}\n"
    "{%- if dialog | length == 0 -%}"
    "{{- raise_exception('a dialog needs a user message after the optional system message') -}}"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- for tag in [" + _REFUSED_TEXT + "] -%}\n"
    "{%- if tag in message['content'] -%}"
    "{{- raise_exception('message text must not contain ' + tag) -}}"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endfor -%}\n"
    "{%- for message in dialog -%}\n"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('roles must alternate user/assistant after an optional system message') -}}"
    "{%- endif -%}\n" + _STRIP_CONTENT + "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + text.value + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + text.value + ' ' + eos_token -}}"
    "{%- endif -%}\n"
    "{%- endfor -%}"
)


class DialogError(ValueError):
    """A dialog that the Llama-2 chat format cannot encode."""


def check_dialog(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Validate roles and text, and fold a leading system message into the first user turn.

    Returns the dialog as alternating user/assistant messages (Meta's folding).
    """
    if not messages:
        raise DialogError("dialog is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - {"name"}:
            raise DialogError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DialogError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DialogError(f"message {i}: content must be a string, got {type(content).__name__}")
        for tag in TURN_TAGS:
            if tag in content:
                raise DialogError(
                    f"message {i} ({role}) contains {tag!r}: turn-boundary text is not allowed in a message"
                )
    dialog = [{"role": m["role"], "content": m["content"]} for m in messages]
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise DialogError("a system message must be followed by a user message")
        system, first = dialog[0], dialog[1]
        dialog = [{"role": first["role"], "content": B_SYS + system["content"] + E_SYS + first["content"]}]
        dialog += [{"role": m["role"], "content": m["content"]} for m in messages[2:]]
    for i, message in enumerate(dialog):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DialogError(
                f"roles must alternate user/assistant after an optional system message: "
                f"turn {i} is {message['role']!r}, expected {expected!r}"
            )
    return dialog


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text: no BOS/EOS added, and `<s>`-like text stays text."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def encode_dialog_segments(
    messages: Sequence[dict[str, Any]], tokenizer
) -> list[tuple[list[int], list[int]]]:
    """Per turn, (prompt ids, answer ids): the prompt is BOS + `[INST] ... [/INST]`, the answer is
    ` answer ` + EOS (empty for the open turn at the end). Concatenated, they are `encode_dialog`.
    """
    dialog = check_dialog(messages)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    segments = []
    for i in range(0, len(dialog), 2):
        user = dialog[i]["content"].strip()
        if i + 1 < len(dialog):
            answer = dialog[i + 1]["content"].strip()
            # Meta encodes the whole exchange in one call, so tokenize it whole and split after
            # `[/INST]`: SentencePiece may merge across that boundary differently than in two calls.
            exchange = encode_text(tokenizer, f"{B_INST} {user} {E_INST} {answer} ")
            prompt = encode_text(tokenizer, f"{B_INST} {user} {E_INST}")
            if exchange[: len(prompt)] != prompt:  # never with SentencePiece's whitespace splitting
                raise DialogError(
                    f"the tokenizer merges across '{E_INST}' in turn {i}: prompt and answer cannot be split"
                )
            segments.append(([bos] + prompt, exchange[len(prompt) :] + [eos]))
        else:
            segments.append(([bos] + encode_text(tokenizer, f"{B_INST} {user} {E_INST}"), []))
    return segments


def encode_dialog(messages: Sequence[dict[str, Any]], tokenizer) -> list[int]:
    """Exactly the token ids of Meta's `Llama.chat_completion` for this dialog.

    A dialog ending with a user turn is a prompt (last `[INST] ... [/INST]` left open, no EOS);
    one ending with an assistant turn is a training example (every exchange closed with EOS).
    """
    return [i for prompt, answer in encode_dialog_segments(messages, tokenizer) for i in prompt + answer]
