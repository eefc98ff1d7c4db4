"""A stand-in for text-generation-inference (TGI), for tests only.

TGI itself cannot run on this machine (no container engine daemon, no GPU), so the smoke stage's TGI
client (`pipeline.engines.tgi.TGIClient`, `pipeline.checks.answering.chat_answers`,
`pipeline.engines.tgi.tgi_live`) is
tested against this small, real HTTP server (http.server on 127.0.0.1, a free port, served from a
thread). It is not TGI and does not pretend to be more than the few endpoints the smoke stage uses;
it is built on the real parts:

- the chat prompt, as TGI's router makes it: the model dir's `chat_template` rendered by minijinja
  with TGI's variables (`pipeline.engines.encoding.TGIEngine`) and tokenized by the `tokenizers` library from
  tokenizer.json with add_special_tokens=False (chat) or True (`/generate` inputs, TGI's default);
- generation: llama.cpp (`llama_cpp.Llama`) on a GGUF of the same model, greedy, fed exactly those ids;
- the wire format: TGI's own OpenAPI document (router 3.3.6-dev0, ../shared/data/tgi/openapi.json).
  Every request body is validated against the requestBody schema of its path (invalid: HTTP 422 with
  an ErrorResponse body, as TGI answers), and every response body it serves is validated against the
  response schema documented for that path and status. Violations of the latter are recorded in
  `schema_errors` (and answered with HTTP 500) so tests can assert that what the client sends and
  what it parses both follow TGI's schema.

Endpoints: GET /health, POST /chat_tokenize, POST /v1/chat/completions (non-streaming),
POST /generate. Template errors answer 422 `{"error": "Template error: ...", "error_type":
"template_error"}`, as TGI's router does (`InferError::TemplateError` -> UNPROCESSABLE_ENTITY).

`chat_add_special_tokens=True` makes a deliberately broken variant: the chat path tokenizes the
templated text with add_special_tokens=True, so the BOS the template already emits is doubled.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCHEMA_URI = "urn:tgi-openapi"


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def openapi_to_json_schema(node):
    """OpenAPI 3.0 `nullable: true` is not JSON Schema: rewrite it as `anyOf: [null, <schema>]`.

    Everything else in TGI's document already reads as JSON Schema 2020-12 (its `exclusiveMinimum`
    values are numbers; `example`, `discriminator` and `format: int32` are annotations)."""
    if isinstance(node, list):
        return [openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_to_json_schema(value) for key, value in node.items()}
    # a bool `nullable` is the keyword (a property *named* nullable would map to a schema object)
    nullable = out.pop("nullable") if isinstance(out.get("nullable"), bool) else False
    return {"anyOf": [{"type": "null"}, out]} if nullable else out


class OpenAPISchemas:
    """Validators for TGI's request and response bodies, refs resolved over the whole document."""

    def __init__(self, openapi_path: Path):
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.document = json.loads(Path(openapi_path).read_text())
        converted = openapi_to_json_schema(copy.deepcopy(self.document))
        self.registry = Registry().with_resource(
            SCHEMA_URI, Resource(contents=converted, specification=DRAFT202012)
        )
        self._validators: dict[str, object] = {}

    def validator(self, pointer: str):
        from jsonschema import Draft202012Validator

        if pointer not in self._validators:
            schema = {"$ref": SCHEMA_URI + pointer}
            self._validators[pointer] = Draft202012Validator(schema, registry=self.registry)
        return self._validators[pointer]

    def errors(self, pointer: str, instance) -> list[str]:
        found = sorted(self.validator(pointer).iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message[:300]}" for e in found]

    def operation(self, path: str, method: str) -> dict:
        return self.document["paths"][path][method]

    def request_pointer(self, path: str, method: str = "post") -> str:
        self.operation(path, method)["requestBody"]["content"]["application/json"]["schema"]  # must exist
        return _pointer("paths", path, method, "requestBody", "content", "application/json", "schema")

    def response_pointer(self, path: str, method: str, status: int) -> str | None:
        """The documented schema of a JSON response; an undocumented error status gets ErrorResponse,
        which is what TGI's router sends for every error."""
        response = self.operation(path, method)["responses"].get(str(status))
        if response is not None:
            if "application/json" not in response.get("content", {}):
                return None  # documented without a body (GET /health 200)
            return _pointer(
                "paths", path, method, "responses", str(status), "content", "application/json", "schema"
            )
        if status >= 400:
            return "#/components/schemas/ErrorResponse"
        raise KeyError(f"{method.upper()} {path}: status {status} is not documented in TGI's schema")


class TGIStandIn:
    """The stand-in server; use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        hf_dir: Path,
        gguf: Path,
        openapi: Path,
        *,
        chat_add_special_tokens: bool = False,
        n_ctx: int = 512,
        model_id: str = "tgi-standin",
    ):
        from llama_cpp import Llama

        from pipeline.engines.encoding import TGIEngine

        self.engine = TGIEngine(Path(hf_dir))
        self.tokenizer = self.engine.tokenizer  # tokenizers.Tokenizer from tokenizer.json
        self.eos_id = self.tokenizer.token_to_id(self.engine.eos_token)
        self.schemas = OpenAPISchemas(openapi)
        self.chat_add_special_tokens = chat_add_special_tokens
        self.model_id = model_id
        # One thread: the test model is tiny, and a thread pool spinning at a barrier on a busy
        # 2-core machine costs more than it saves.
        self.llama = Llama(
            model_path=str(gguf), n_ctx=n_ctx, seed=0, n_threads=1, n_threads_batch=1, verbose=False
        )
        if self.llama.token_eos() != self.eos_id:
            raise ValueError(
                f"{gguf} and {hf_dir} disagree on EOS: {self.llama.token_eos()} != {self.eos_id}"
            )
        self.n_ctx = n_ctx
        self._llama_lock = threading.Lock()  # one llama.cpp context: one generation at a time
        self._log_lock = threading.Lock()
        self.calls: list[dict] = []  # every request: path, status, body
        self.schema_errors: list[dict] = []  # responses this stand-in served that broke TGI's schema
        self.invalid_requests: list[dict] = []  # request bodies that broke TGI's schema (answered 422)
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> TGIStandIn:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="tgi-standin", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=30)
            self.server = None
        with self._llama_lock:
            self.llama.close()

    def __enter__(self) -> TGIStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- TGI's parts ----------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> tuple[str, object]:
        """TGI's chat path: template text and its `tokenizers` encoding (raises TemplateRefused)."""
        text = self.engine.render(messages)
        return text, self.tokenizer.encode(text, add_special_tokens=self.chat_add_special_tokens)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
        """Greedy tokens after `prompt_ids` (EOS excluded) and whether generation ended on EOS."""
        max_new_tokens = min(max_new_tokens, self.n_ctx - len(prompt_ids))
        if max_new_tokens <= 0:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in n_ctx={self.n_ctx}")
        generated = []
        with self._llama_lock:
            self.llama.reset()
            for token in self.llama.generate(
                prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0
            ):
                if token == self.eos_id:
                    return generated, True
                generated.append(token)
                if len(generated) >= max_new_tokens:
                    break
        return generated, False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- endpoints: (status, body) ----------------------------------------------------------------

    def health(self, body) -> tuple[int, object]:
        return 200, None

    def chat_tokenize(self, body) -> tuple[int, object]:
        text, encoding = self.chat_prompt(body["messages"])
        tokens = [
            {"id": i, "text": text[start:stop], "start": start, "stop": stop}
            for i, (start, stop) in zip(encoding.ids, encoding.offsets)
        ]
        return 200, {"tokenize_response": tokens, "templated_text": text}

    def chat_completions(self, body) -> tuple[int, object]:
        if body.get("stream"):
            return 422, {"error": "the TGI stand-in does not stream", "error_type": "validation"}
        _, encoding = self.chat_prompt(body["messages"])
        max_tokens = body.get("max_tokens")
        generated, eos = self.greedy(encoding.ids, 1024 if max_tokens is None else max_tokens)
        return 200, {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": "3.3.6-dev0-standin",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.decode(generated)},
                    "logprobs": None,
                    "finish_reason": "stop" if eos else "length",
                }
            ],
            "usage": {
                "prompt_tokens": len(encoding.ids),
                "completion_tokens": len(generated) + eos,
                "total_tokens": len(encoding.ids) + len(generated) + eos,
            },
        }

    def generate(self, body) -> tuple[int, object]:
        parameters = body.get("parameters") or {}
        prompt_ids = self.tokenizer.encode(body["inputs"], add_special_tokens=True).ids  # TGI's default
        max_new = parameters.get("max_new_tokens")
        generated, eos = self.greedy(prompt_ids, 1024 if max_new is None else max_new)
        response = {"generated_text": self.decode(generated)}
        if parameters.get("details", True) or parameters.get("decoder_input_details"):
            all_ids = generated + ([self.eos_id] if eos else [])
            response["details"] = {
                "finish_reason": "eos_token" if eos else "length",
                "generated_tokens": len(all_ids),
                "prefill": [
                    {"id": i, "text": self.tokenizer.decode([i], skip_special_tokens=False), "logprob": None}
                    for i in prompt_ids
                ]
                if parameters.get("decoder_input_details")
                else [],
                "tokens": [
                    {
                        "id": i,
                        "text": self.tokenizer.decode([i], skip_special_tokens=False),
                        "logprob": None,
                        "special": i == self.eos_id,
                    }
                    for i in all_ids
                ],
                "seed": None,
                "top_tokens": [],
            }
        return 200, response

    ROUTES = {
        ("GET", "/health"): "health",
        ("POST", "/chat_tokenize"): "chat_tokenize",
        ("POST", "/v1/chat/completions"): "chat_completions",
        ("POST", "/generate"): "generate",
    }

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, object]:
        from pipeline.engines.encoding import TemplateRefused

        route = self.ROUTES.get((method, path))
        if route is None:
            return 404, None
        body = None
        if method == "POST":
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError as err:
                return 400, {
                    "error": f"Failed to parse the request body as JSON: {err}",
                    "error_type": "validation",
                }
            problems = self.schemas.errors(self.schemas.request_pointer(path), body)
            if problems:
                with self._log_lock:
                    self.invalid_requests.append({"path": path, "request": body, "problems": problems})
                return 422, {
                    "error": "Failed to deserialize the JSON body into the target type: "
                    + "; ".join(problems),
                    "error_type": "validation",
                }
        try:
            return getattr(self, route)(body)
        except TemplateRefused as err:
            return 422, {"error": f"Template error: {err}", "error_type": "template_error"}
        except ValueError as err:
            return 422, {"error": f"Input validation error: {err}", "error_type": "validation"}

    def respond(self, method: str, path: str, raw: bytes) -> tuple[int, object]:
        """`handle`, then the response checked against TGI's schema before it is served."""
        status, response = self.handle(method, path, raw)
        problems = []
        if status != 404:
            pointer = self.schemas.response_pointer(path, method.lower(), status)
            if pointer is None:
                problems = [] if response is None else ["a body where TGI's schema documents none"]
            else:
                problems = self.schemas.errors(pointer, response)
        with self._log_lock:
            try:
                request = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                request = raw
            self.calls.append({"method": method, "path": path, "status": status, "request": request})
            if problems:
                self.schema_errors.append({"path": path, "status": status, "problems": problems})
        if problems:
            return 500, {
                "error": "TGI stand-in response broke TGI's schema: " + "; ".join(problems),
                "error_type": "standin",
            }
        return status, response


def _handler(standin: TGIStandIn):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, body = standin.respond(method, self.path.split("?", 1)[0], raw)
            payload = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):  # noqa: N802
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):  # quiet
            pass

    return Handler
