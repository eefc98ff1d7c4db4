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

# Ollama never runs the GGUF's Jinja template: a model created from a Modelfile with a TEMPLATE is
# rendered by ollama itself as a Go text/template over `.Messages` (`pipeline/engines/ollama.py` writes the
# Modelfile). Its tokenizer adds the first BOS and parses `<s>`/`</s>` in the text as control tokens,
# so the first `<s>` is not written and that text is refused in a message. Go has no strip function,
# so `llama2-strip` removes str.strip()'s set recursively; errors are calls of an undefined template.
# Printable ASCII with Go escapes: ollama's Modelfile parser drops every non-printable character.
# Outside the template ollama differs from Meta: it merges consecutive same-role messages with
# "\n\n", drops old messages when the prompt overflows num_ctx, and adds the Modelfile SYSTEM when
# the request has no system message.
_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _go_string(text: str) -> str:
    """`text` as a Go string literal in printable ASCII."""

    def char(c: str) -> str:
        if c in _GO_ESCAPES:
            return _GO_ESCAPES[c]
        if " " <= c <= "~":
            return c
        if c.isascii():
            return f"\\x{ord(c):02x}"
        return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"

    return '"' + "".join(map(char, text)) + '"'


def _go_error(message: str) -> str:
    return "{{ template " + _go_string("llama2 error: " + message) + " . }}"


def _go_strip() -> str:
    """`llama2-strip`: Python's str.strip(), one whole UTF-8 character per recursion level."""
    sizes = sorted({len(c.encode()) for c in PY_WHITESPACE})
    spaces = {n: " ".join(_go_string(c) for c in PY_WHITESPACE if len(c.encode()) == n) for n in sizes}
    cases = [(f"(slice . 0 {n})", f"(slice . {n})", n) for n in sizes]  # at the front
    cases += [(f"(slice . (len (slice . {n})))", f"(slice . 0 (len (slice . {n})))", n) for n in sizes]
    lines = ['{{- define "llama2-strip" }}']
    for k, (part, rest, n) in enumerate(cases):
        branch = "else if" if k else "if"
        test = f"and (ge (len .) {n}) (eq {part} {spaces[n]})"
        lines.append(f'{{{{- {branch} {test} }}}}{{{{ template "llama2-strip" {rest} }}}}')
    return "\n".join([*lines, "{{- else }}{{ . }}", "{{- end }}", "{{- end -}}"])


def _go_check() -> str:
    """`llama2-check`: refuse turn tags and control-token text, one byte per recursion level (so a
    message may hold up to ~99,990 bytes: text/template's depth limit is 100,000)."""
    tags = TURN_TAGS + CONTROL_TOKEN_TEXT
    shortest, firsts = min(map(len, tags)), " ".join(_go_string(c) for c in sorted({t[0] for t in tags}))
    found = " ".join(
        f"(and (ge (len .) {n}) (eq (slice . 0 {n}) {' '.join(_go_string(t) for t in tags if len(t) == n)}))"
        for n in sorted(set(map(len, tags)))
    )
    refused = ", ".join(tags[:-1]) + " or " + tags[-1]
    return "\n".join(
        [
            '{{- define "llama2-check" }}',
            f"{{{{- if and (ge (len .) {shortest}) (eq (slice . 0 1) {firsts}) (or {found}) }}}}"
            + _go_error("message text must not contain " + refused),
            f'{{{{- else if ge (len .) {shortest + 1} }}}}{{{{ template "llama2-check" (slice . 1) }}}}',
            "{{- end }}",
            "{{- end -}}",
        ]
    )


# Meta's folding of the system message into the first user turn, as check_dialog does.
_GO_FOLD_SYSTEM = "(printf " + _go_string(B_SYS + "%s" + E_SYS + "%s") + " $system $m.Content)"

LLAMA2_OLLAMA_TEMPLATE = "\n".join(
    [
        "{{- /* Llama-2 chat as Meta's chat_completion lays it out. The first BOS is not written:",
        "ollama's tokenizer adds it (add_special=true); later <s> and </s> are parsed as control tokens",
        "(parse_special=true). Message text is stripped like Python's str.strip(). */ -}}",
        '{{- $system := "" }}',
        "{{- $hasSystem := false }}",
        '{{- $want := "user" }}',
        "{{- $first := true }}",
        "{{- range $i, $m := .Messages }}",
        '{{- template "llama2-check" $m.Content }}',
        '{{- if eq $m.Role "system" }}',
        "{{- if $i }}" + _go_error("only the first message may be a system message") + "{{ end }}",
        "{{- $system = $m.Content }}",
        "{{- $hasSystem = true }}",
        "{{- else if ne $m.Role $want }}"
        + _go_error("roles must alternate user/assistant after an optional system message"),
        '{{- else if eq $m.Role "user" }}',
        f"{{{{- if not $first }}}}<s>{{{{ end }}}}{B_INST} {{{{ if and $first $hasSystem }}}}"
        f'{{{{ template "llama2-strip" {_GO_FOLD_SYSTEM} }}}}'
        f'{{{{ else }}}}{{{{ template "llama2-strip" $m.Content }}}}{{{{ end }}}} {E_INST}',
        "{{- $first = false }}",
        '{{- $want = "assistant" }}',
        '{{- else }} {{ template "llama2-strip" $m.Content }} </s>',
        '{{- $want = "user" }}',
        "{{- end }}",
        "{{- end }}",
        "{{- if $first }}"
        + _go_error("a dialog needs a user message after the optional system message")
        + "{{ end }}",
        _go_strip(),
        _go_check(),
    ]
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
