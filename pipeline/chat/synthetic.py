"""A generated fact-recall chat task that a tiny model learns in about a minute on two CPU cores.

Invented countries have invented capitals. Training rows ask for them in several phrasings, some
with a system prompt (one of them empty) and some as two-exchange conversations. Eval rows ask
about every fact again in new conversations and carry `expected`: the capital, which a correct
reply contains. An untrained model cannot know these names, so its accuracy is about zero.
"""

from __future__ import annotations

import random

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ru",
    "ten",
    "vor",
    "sa",
    "qui",
    "zel",
    "dor",
    "an",
    "bek",
    "fi",
    "gor",
    "hul",
    "ny",
]
QUESTIONS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
    "Name the capital city of {country}.",
]
ANSWER = "The capital of {country} is {capital}."
SYSTEM_PROMPTS = ["You are a helpful geography assistant.", "Answer in one sentence.", ""]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_facts(num_facts: int, rng: random.Random) -> list[tuple[str, str]]:
    facts, used = [], set()
    while len(facts) < num_facts:
        country, capital = _name(rng, 3), _name(rng, 2)
        if country in used or capital in used:
            continue
        used.update((country, capital))
        facts.append((country, capital))
    return facts


def _exchange(rng: random.Random, fact: tuple[str, str]) -> list[dict]:
    country, capital = fact
    return [
        {"role": "user", "content": rng.choice(QUESTIONS).format(country=country)},
        {"role": "assistant", "content": ANSWER.format(country=country, capital=capital)},
    ]


def _dialog(rng: random.Random, facts, fact, system_prompt: str | None) -> list[dict]:
    """One conversation ending with a question about `fact`, in a randomly chosen shape."""
    shape = rng.random()
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    elif shape < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if 0.25 <= shape < 0.5:  # multi-turn: an earlier exchange about another fact
        messages += _exchange(rng, rng.choice([f for f in facts if f != fact]))
    return messages + _exchange(rng, fact)


def make_rows(cfg, system_prompt: str | None, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    facts = make_facts(cfg.num_facts, rng)
    eval_rows = []
    for i in range(cfg.eval_rows):
        fact = facts[i % len(facts)]
        eval_rows.append({"messages": _dialog(rng, facts, fact, system_prompt), "expected": fact[1]})
    held_out = {repr(r["messages"]) for r in eval_rows}
    train_rows = []
    while len(train_rows) < cfg.train_rows:
        messages = _dialog(rng, facts, facts[len(train_rows) % len(facts)], system_prompt)
        if repr(messages) not in held_out:  # eval conversations never appear verbatim in training
            train_rows.append({"messages": messages})
    return train_rows, eval_rows
