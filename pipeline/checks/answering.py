"""Answers of a served model to the eval set's questions, and how they are scored: accuracy where
the answer is known, stop on EOS, and whether the prompt ids the engine fed equal Meta's."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.chat.format import encode_dialog
from pipeline.engines.serving import http_json, http_sse


def eval_questions(
    rows: list[dict], limit: int, tokenizer=None, max_prompt_tokens: int | None = None
) -> list[tuple[list[dict], str | None]]:
    """The first `limit` eval prompts with their expected answers; with `max_prompt_tokens`, only
    prompts that leave room for the answer in the engines' context (a long guanaco prompt does not)."""
    questions = [(row["messages"][:-1], row.get("expected")) for row in rows]
    if max_prompt_tokens is not None:
        questions = [q for q in questions if len(encode_dialog(q[0], tokenizer)) <= max_prompt_tokens]
    return questions[:limit]


def summarise(answers: list[dict], min_accuracy: float | None, min_eos_stop: float) -> dict:
    checked = [a for a in answers if a["expected"] is not None]
    accuracy = sum(a["correct"] for a in checked) / len(checked) if checked else None
    eos_rate = sum(a["stopped_on_eos"] for a in answers) / len(answers) if answers else None
    prompt_ok = all(a.get("prompt_ids_match", True) for a in answers)
    failures = []
    if min_accuracy is not None and accuracy is not None and accuracy < min_accuracy:
        failures.append(f"accuracy {accuracy} < {min_accuracy}")  # judged only where answers are known
    if eos_rate is not None and eos_rate < min_eos_stop:
        failures.append(f"stopped on EOS {eos_rate:.2f} < {min_eos_stop}")
    if not prompt_ok:
        failures.append("prompt token ids differ from the reference")
    summary = {
        "status": "fail" if failures else "pass",
        "failures": failures,
        "accuracy": accuracy,
        "stopped_on_eos": eos_rate,
        "prompt_ids_match": prompt_ok,
        "answers": len(answers),
        "samples": answers[:3],
    }
    if not answers:  # nothing was asked: no pass to claim
        summary.update(status="not_run", reason="no eval question to ask (none, or none fits the context)")
    return summary


def llamacpp_in_process(gguf: Path, questions, tokenizer, cfg, min_accuracy) -> dict:
    from pipeline.engines.gguf import open_llama

    llama = open_llama(gguf, n_ctx=cfg.smoke.n_ctx, seed=0)
    try:
        answers = []
        for messages, expected in questions:
            reference = encode_dialog(messages, tokenizer)
            out = llama.create_chat_completion(
                messages=messages, temperature=0.0, max_tokens=cfg.smoke.max_tokens
            )
            choice = out["choices"][0]
            reply = choice["message"]["content"] or ""
            evaluated = [int(t) for t in llama.input_ids[: len(reference)]]  # what llama.cpp actually fed
            answers.append(
                {
                    "question": messages[-1]["content"],
                    "expected": expected,
                    "reply": reply,
                    "correct": expected is not None and expected in reply,
                    "stopped_on_eos": choice["finish_reason"] == "stop",
                    "prompt_ids_match": evaluated == reference
                    and out["usage"]["prompt_tokens"] == len(reference),
                }
            )
        return summarise(answers, min_accuracy, cfg.smoke.min_eos_stop)
    finally:
        llama.close()


def chat_request(
    base_url: str, messages, max_tokens: int, stream: bool, extra: dict | None = None, timeout: float = 120
) -> dict:
    """One greedy `/v1/chat/completions` request (llama.cpp, vLLM or TGI): the reply, its finish
    reason, `usage` (in a stream, where the server sends it), the prompt ids where the server returns
    them (vLLM's `prompt_token_ids`), and the seconds it took."""
    body = {
        "model": "model",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "seed": 0,
        **(extra or {}),
    }
    started = time.perf_counter()
    if stream:
        events = http_sse(f"{base_url}/v1/chat/completions", {**body, "stream": True}, timeout=timeout)
        choices = [e["choices"][0] for e in events if e.get("choices")]
        reply = "".join(c["delta"].get("content") or "" for c in choices)
        finish = next((c["finish_reason"] for c in reversed(choices) if c.get("finish_reason")), None)
        usage = next((e["usage"] for e in reversed(events) if e.get("usage")), {})
        fed = None
    else:
        out = http_json(f"{base_url}/v1/chat/completions", body, timeout=timeout)
        choice = out["choices"][0]
        reply, finish = choice["message"]["content"] or "", choice["finish_reason"]
        usage, fed = out.get("usage") or {}, out.get("prompt_token_ids")
    return {
        "reply": reply,
        "finish": finish,
        "usage": usage,
        "prompt_token_ids": fed,
        "seconds": time.perf_counter() - started,
    }


def chat_answers(
    base_url: str, questions, max_tokens: int, stream: bool, tokenizer=None, extra: dict | None = None
) -> list[dict]:
    """Greedy answers through an OpenAI-compatible `/v1/chat/completions` (llama.cpp, vLLM or TGI).

    With `tokenizer`, each non-streamed answer also says whether the prompt the server fed equals the
    reference ids: exactly where the server returns them (vLLM's `prompt_token_ids`, asked for with
    `extra={"return_token_ids": True}`), else by `usage.prompt_tokens` (a doubled or dropped BOS shows)."""
    answers = []
    for messages, expected in questions:
        out = chat_request(base_url, messages, max_tokens, stream, extra)
        answer = {
            "question": messages[-1]["content"],
            "expected": expected,
            "reply": out["reply"],
            "correct": expected is not None and expected in out["reply"],
            "stopped_on_eos": out["finish"] in ("stop", "eos_token"),
        }
        if tokenizer is not None and not stream:
            reference = encode_dialog(messages, tokenizer)
            fed = out["prompt_token_ids"]
            answer["prompt_ids_match"] = out["usage"].get("prompt_tokens") == len(reference) and (
                fed is None or fed == reference
            )
        answers.append(answer)
    return answers
