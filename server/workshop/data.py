"""The workshop's data stage: training pairs for a feature given only as a description, generated
by the served model through the running engine.

Semantics (pairs shaped like hand-written examples: the same answer with and without the
concept): for each of ``GEN_PROMPTS`` user turns of the corpora's train split (none is a
calibration or eval prompt) the engine first answers plainly; that answer is the negative, kept
only if it uses none of the description's words (:func:`description_words`, matched by stem).
Then it rewrites that answer ``SAMPLES`` times after a system message asking for the concept
(:data:`REWRITE` with the description); the positive is the rewrite that uses the most of the
description's words, kept only if it uses one. (Measured on Qwen2.5-0.5B, see docs/workshop.md:
pairs whose positive was a fresh answer written under the instruction differed in everything an
instruction changes, and their mean difference reached the topic only far past the fluent
doses; eight hand-written pairs that differ only in the topic did at strength 1.) The requests go
straight to the engine at normal priority, batched with the traffic being served.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from server.state import AppState

GEN_PROMPTS = 48
SAMPLES = 4
"""Instructed answers per prompt (the plain answer is one)."""
GEN_TOKENS = 64
TEMPERATURE = 0.8
REWRITE = ("Rewrite the text the user sends so that it is about this, and names it plainly: "
           "{description}. Keep its length and its form. Reply with the rewritten text only.")
_WORD = re.compile(r"[a-z]+")
_STOP = frozenset("""a about above after again all also an and any are as at be been being both but by
can could did do does doing for from had has have how if in into is it its just like made make
makes more most my no not of on or other our out over own same she should so some such talk talks
talking than that the their them then there these they this those through to too under up use
uses very was we were what when where which while who why will with would you your""".split())


def description_words(description: str) -> list[str]:
    """The stems of the description's content words (3+ letters, no function words)."""
    stems = {_stem(w) for w in _WORD.findall(description.lower()) if len(w) >= 3 and w not in _STOP}
    return sorted(stems)


def _stem(word: str) -> str:
    """A crude stem (plural, -ing, -ed cut), enough to match "beaches"/"beach", "sailing"/"sail"."""
    if word.endswith("ing") and len(word) >= 6:
        return word[:-3]
    if word.endswith("ed") and len(word) >= 5:
        return word[:-2]
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) >= 4:
        return word[:-1]
    return word


def hits(text: str, stems: list[str]) -> int:
    """How many words of ``text`` have one of ``stems``."""
    wanted = set(stems)
    return sum(_stem(w) in wanted for w in _WORD.findall(text.lower()))


def train_prompts(n: int = GEN_PROMPTS) -> list[str]:
    """The first ``n`` user turns of the corpora's train split (round-robin, fixed order)."""
    from steering.builders import corpora

    out: list[str] = []
    for _, conv in corpora.interleave(["chitchat", "wiki"], "train"):
        text = next((m["content"] for m in conv if m["role"] == "user" and m["content"].strip()), None)
        if text and len(text) < 400:
            out.append(text)
        if len(out) >= n:
            break
    return out


async def generate_pairs(state: AppState, description: str,
                         on_progress: Callable[[float], None] | None = None
                         ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(pairs, record of how they were made) — see the module docstring."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, tok = state.require_engine(), state.tokenizer
    prompts = await asyncio.to_thread(train_prompts)
    system = REWRITE.format(description=description.strip().rstrip("."))
    stems = description_words(description)
    done = 0

    async def answers(i: int, msgs: list[dict[str, str]], n: int, tokens: int) -> list[str]:
        nonlocal done
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)  # the template holds the special tokens
        params = SamplingParams(n=n, max_tokens=tokens, temperature=TEMPERATURE, seed=1000 + i,
                                repetition_penalty=1.1)
        outs: list[str] = []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                         f"workshop-data-{uuid.uuid4().hex}"):
            outs = [o.text.strip() for o in sorted(out.outputs, key=lambda o: o.index)]
        done += 1
        if on_progress is not None:
            on_progress(done / (2 * len(prompts)))
        return outs

    plain = await asyncio.gather(*(answers(i, [{"role": "user", "content": p}], 1, GEN_TOKENS)
                                   for i, p in enumerate(prompts)))
    negatives = {i: outs[0] for i, outs in enumerate(plain)
                 if outs and outs[0] and hits(outs[0], stems) == 0}
    done += len(prompts) - len(negatives)  # no rewrite asked for these
    rewrites = await asyncio.gather(*(
        answers(i, [{"role": "system", "content": system}, {"role": "user", "content": neg}],
                SAMPLES, GEN_TOKENS + GEN_TOKENS // 2)
        for i, neg in negatives.items()))
    pairs = []
    for (i, neg), outs in zip(negatives.items(), rewrites):
        best = max(outs, key=lambda t: hits(t, stems), default="")
        if best and hits(best, stems) > 0:
            pairs.append({"prompt": prompts[i], "positive": best, "negative": neg})
    record = {"source": "generated", "prompts": len(prompts), "kept": len(pairs),
              "instruction": system, "samples": SAMPLES, "max_tokens": GEN_TOKENS,
              "temperature": TEMPERATURE, "description_words": stems,
              "filter": "negative: the plain answer, using no description word; positive: of its "
                        "rewrites under the instruction, the one using the most description words "
                        "(at least one)",
              "prompt_source": "corpora train split (chitchat, wiki), user turns"}
    return pairs, record
