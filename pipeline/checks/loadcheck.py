"""The served model under load: many concurrent chat requests to one `llama-server` with several
parallel slots, streamed and not. Each request must still be fed Meta's ids, stop on EOS, and get
its own answer (no cross-talk between slots); latency and throughput are reported, not judged."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.chat.format import encode_dialog
from pipeline.checks.answering import chat_request
from pipeline.engines.encoding import LlamaServerEngine


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def judge_reply(
    reply: str, index: int, alone: dict[int, str], expected: str | None, same_answer_as_alone: bool
) -> tuple[bool, bool]:
    """(cross-talk, differs from its prompt's reply asked alone) for one reply under load."""
    own = reply == alone[index] or (expected is not None and expected in reply)
    if same_answer_as_alone:
        return not own, reply != alone[index]
    others = {other for other in alone.values() if other != alone[index]}
    return not own and reply in others, reply != alone[index]


def load_check(
    base_url: str,
    questions,
    tokenizer,
    max_tokens: int,
    requests: int,
    timeout: float,
    min_eos_stop: float = 1.0,
    same_answer_as_alone: bool = True,
) -> dict:
    """`requests` concurrent requests over `questions` (cycled), every other one streamed. A reply is
    its own when it equals the same prompt's reply asked alone, or holds the prompt's expected answer.
    With `same_answer_as_alone` off (a model whose greedy answer batching can flip), a reply is
    cross-talk only when it equals another prompt's reply asked alone and not its own; replies that
    differ from their own are counted, not judged. At least `min_eos_stop` of the answers must end
    on EOS (smoke.min_eos_stop, as for single answers)."""
    if not questions:
        return {"status": "not_run", "reason": "no eval question to ask (none, or none fits the context)"}
    engine = LlamaServerEngine(base_url)
    alone = {
        i: chat_request(base_url, q[0], max_tokens, False, timeout=timeout)["reply"]
        for i, q in enumerate(questions)
    }
    jobs = [(i % len(questions), i % 2 == 1) for i in range(requests)]

    def run(job):
        index, stream = job
        messages = questions[index][0]
        # A stream sends `usage` in its last event only when asked (OpenAI's stream_options).
        extra = {"stream_options": {"include_usage": True}} if stream else None
        result = chat_request(base_url, messages, max_tokens, stream, extra, timeout)
        result["tokenized"] = engine.chat_ids(messages)  # /apply-template + /tokenize, under the same load
        return index, stream, result

    started = time.perf_counter()
    failed, results = [], []
    with ThreadPoolExecutor(max_workers=requests) as pool:
        for future in [pool.submit(run, job) for job in jobs]:
            try:
                results.append(future.result(timeout=timeout))
            except Exception as err:  # noqa: BLE001 - a failed request is a figure here, not a crash
                failed.append(f"{type(err).__name__}: {err}"[:200])
    wall = time.perf_counter() - started
    problems = {"prompt_ids": 0, "not_stopped_on_eos": 0, "cross_talk": 0}
    differs_from_alone = 0
    for index, _, result in results:
        messages, expected = questions[index]
        reference = encode_dialog(messages, tokenizer)
        problems["prompt_ids"] += (
            result["usage"].get("prompt_tokens") != len(reference) or result["tokenized"] != reference
        )
        problems["not_stopped_on_eos"] += result["finish"] != "stop"
        cross_talk, differs = judge_reply(result["reply"], index, alone, expected, same_answer_as_alone)
        problems["cross_talk"] += cross_talk
        differs_from_alone += differs
    latencies = [r["seconds"] for _, _, r in results]
    completion = sum(r["usage"].get("completion_tokens") or 0 for _, _, r in results)
    stopped = 1 - problems["not_stopped_on_eos"] / len(results) if results else 0.0
    judged = {**problems, "not_stopped_on_eos": problems["not_stopped_on_eos"] * (stopped < min_eos_stop)}
    failures = [f"{n} request(s) failed" for n in [len(failed)] if n] + [
        f"{count} request(s): {name.replace('_', ' ')}" for name, count in judged.items() if count
    ]
    return {
        "status": "fail" if failures else "pass",
        "failures": failures,
        "requests": requests,
        "streamed": sum(stream for _, stream in jobs),
        "distinct_prompts": len(questions),
        "completed": len(results),
        "errors": failed[:5],
        **problems,
        "same_answer_as_alone": same_answer_as_alone,
        # Judged as cross-talk only with same_answer_as_alone; else counted, and named in the report.
        "differs_from_alone": differs_from_alone,
        **(
            {}
            if same_answer_as_alone
            else {
                "not_judged": "replies that differ from their prompt's reply asked alone "
                "(smoke.load.same_answer_as_alone=false: the model's greedy answer is not stable "
                "under batching)"
            }
        ),
        "stopped_on_eos": round(stopped, 3),
        "min_eos_stop": min_eos_stop,
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
        "wall_s": round(wall, 3),
        "completion_tokens": completion,
        "completion_tokens_per_s": round(completion / wall, 1) if wall else None,
    }
