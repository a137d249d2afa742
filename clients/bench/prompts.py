"""The prompts every benchmark part sends (the engine scenarios and the transformers baseline)."""

from __future__ import annotations

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "Describe your ideal weekend.",
    "What makes a good cup of coffee?",
    "Tell me about the history of bicycles.",
    "Give advice to a new gardener.",
    "Why do cats purr?",
    "Describe a busy market in the morning.",
]


def prompts(n: int) -> list[str]:
    """``n`` prompts, cycling through PROMPTS."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
