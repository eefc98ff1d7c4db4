"""TGI, live where it can run: a client for the endpoints the smoke test uses (per TGI's OpenAPI
schema), launching the pinned image with docker, and the live checks against a running server."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.chat.format import DialogError, encode_dialog
from pipeline.checks.answering import chat_answers, summarise
from pipeline.checks.parity import injects_control_text
from pipeline.engines.encoding import TGIEngine
from pipeline.engines.serving import free_port, http_json, wait_until_up
from pipeline.run.errors import ToolFailed


class TGIClient:
    """The few TGI endpoints the smoke test uses (requests and responses per TGI's OpenAPI schema)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def health(self) -> None:
        urllib.request.urlopen(f"{self.base_url}/health", timeout=10).read()

    def chat_tokenize(self, messages: list[dict]) -> tuple[list[int], str]:
        out = http_json(f"{self.base_url}/chat_tokenize", {"model": "tgi", "messages": messages})
        return [token["id"] for token in out["tokenize_response"]], out["templated_text"]

    def generate(self, inputs: str, max_new_tokens: int) -> dict:
        """Greedy `/generate`, with the ids TGI fed the model (prefill) and why it stopped."""
        body = {
            "inputs": inputs,
            "parameters": {
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "details": True,
                "decoder_input_details": True,
            },
        }
        out = http_json(f"{self.base_url}/generate", body)
        details = out.get("details") or {}
        return {
            "generated_text": out["generated_text"],
            "finish_reason": details.get("finish_reason"),
            "prefill_ids": [t["id"] for t in details.get("prefill", [])],
        }


def launch_tgi_docker(cfg, merged: Path) -> tuple[str, str]:
    """(base url, container id) of a TGI container serving `merged`; raises with docker's message."""
    port = free_port()
    command = [
        "docker",
        "run",
        "-d",
        "--rm",
        "-p",
        f"127.0.0.1:{port}:80",
        "-v",
        f"{merged.resolve()}:/model:ro",
        cfg.smoke.tgi.image,
        "--model-id",
        "/model",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise ToolFailed("docker is not installed") from err
    if result.returncode != 0:
        raise ToolFailed(f"docker run failed: {result.stderr.strip()[-300:]}")
    return f"http://127.0.0.1:{port}", result.stdout.strip()


def tgi_live(client: TGIClient, engine: TGIEngine, cases, questions, tokenizer, cfg) -> dict:
    client.health()
    tokenize_equal, tokenize_divergences = 0, []
    for name, messages in cases:
        try:
            reference = encode_dialog(messages, tokenizer)
        except DialogError:
            continue  # refused by the reference: nothing to compare /chat_tokenize with
        try:
            ids, _ = client.chat_tokenize(messages)
        except urllib.error.HTTPError as err:
            if injects_control_text(messages):
                tokenize_equal += 1  # the template refused control-token text: safe
                continue
            tokenize_divergences.append({"case": name, "error": f"HTTP {err.code}"})
            continue
        if ids == reference:
            tokenize_equal += 1
        else:
            tokenize_divergences.append({"case": name, "engine": ids[:16], "reference": reference[:16]})
    answers = chat_answers(client.base_url, questions, cfg.smoke.max_tokens, stream=False)
    chat = summarise(answers, cfg.smoke.min_accuracy.get("merged"), cfg.smoke.min_eos_stop)
    generate_agrees, generate_checked = 0, 0
    for (messages, _), answer in zip(questions, answers):
        # /generate tokenizes with add_special_tokens=true: TGI adds the first BOS itself.
        out = client.generate(engine.render(messages).removeprefix(engine.bos_token), cfg.smoke.max_tokens)
        generate_checked += 1
        same_prompt = out["prefill_ids"] == encode_dialog(messages, tokenizer)
        generate_agrees += same_prompt and out["generated_text"].strip() == answer["reply"].strip()
    failures = chat["failures"] + (
        [f"{len(tokenize_divergences)} /chat_tokenize divergences"] if tokenize_divergences else []
    )
    if generate_agrees < generate_checked:
        failures.append(f"/generate agreed with /v1/chat/completions on {generate_agrees}/{generate_checked}")
    return {
        "status": "fail" if failures else "pass",
        "failures": failures,
        "chat_tokenize": {"equal": tokenize_equal, "divergences": tokenize_divergences},
        "chat": chat,
        "generate": {"agrees": generate_agrees, "checked": generate_checked},
    }


def run_tgi(cfg, merged: Path, engine: TGIEngine, cases, questions, tokenizer) -> dict:
    if cfg.smoke.tgi.url:
        return tgi_live(TGIClient(cfg.smoke.tgi.url), engine, cases, questions, tokenizer, cfg)
    if cfg.smoke.tgi.launch != "docker":
        return {
            "status": "not_run",
            "reason": "no TGI to test: set smoke.tgi.url=http://host:port of a TGI "
            "serving this model, or smoke.tgi.launch=docker",
        }
    try:
        base_url, container = launch_tgi_docker(cfg, merged)
    except (ToolFailed, subprocess.TimeoutExpired) as err:
        return {"status": "not_run", "reason": f"could not start TGI with docker: {err}"}
    try:
        wait_until_up(f"{base_url}/health", None, timeout=cfg.smoke.tgi.startup_timeout)
        return tgi_live(TGIClient(base_url), engine, cases, questions, tokenizer, cfg)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
