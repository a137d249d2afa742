"""The workshop's data stage: training pairs for a feature given only as a description, generated
by the served model through the running engine.

Semantics (AxBench's concept data, as ``steer pack gen-data`` makes it, without a scorer): for
each of ``GEN_PROMPTS`` user turns of the corpora's train split (none is a calibration or eval
prompt), the engine answers twice with the same sampling seed — once after a system message that
asks for the concept (:data:`INSTRUCTION` with the description), once after none — and the pair
(prompt, instructed answer, plain answer) is kept when both are non-empty and differ. The
requests go straight to the engine at normal priority: they are batched with the traffic being
served (the cost is measured in docs/workshop.md).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from server.state import AppState

GEN_PROMPTS = 32
GEN_TOKENS = 64
TEMPERATURE = 0.7
INSTRUCTION = ("Whatever the user says, make your whole reply about this, and name it plainly: "
               "{description}")


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
    system = INSTRUCTION.format(description=description)
    done = 0

    async def answer(i: int, prompt: str, instructed: bool) -> str:
        nonlocal done
        msgs = ([{"role": "system", "content": system}] if instructed else []) \
            + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        params = SamplingParams(max_tokens=GEN_TOKENS, temperature=TEMPERATURE, seed=1000 + i,
                                repetition_penalty=1.1)
        text = ""
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                         f"workshop-data-{uuid.uuid4().hex}"):
            text = out.outputs[0].text
        done += 1
        if on_progress is not None:
            on_progress(done / (2 * len(prompts)))
        return text.strip()

    answers = await asyncio.gather(*(answer(i, p, s) for s in (True, False)
                                     for i, p in enumerate(prompts)))
    pos, neg = answers[:len(prompts)], answers[len(prompts):]
    pairs = [{"prompt": p, "positive": a, "negative": b} for p, a, b in zip(prompts, pos, neg)
             if a and b and a != b]
    record = {"source": "generated", "prompts": len(prompts), "kept": len(pairs),
              "instruction": system, "max_tokens": GEN_TOKENS, "temperature": TEMPERATURE,
              "prompt_source": "corpora train split (chitchat, wiki), user turns"}
    return pairs, record
