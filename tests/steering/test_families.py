"""Steering across decoder families, each proven against transformers (float32, greedy, eager).

Per family (tests/steering/tiny_models.py: 3 layers, d = 128, random weights, the bundled
tokenizer) one ``steer serve --enforce-eager`` engine serves:
* unsteered greedy ids = transformers' greedy ids;
* an add vector at the last layer, a clamp at layer 0 and an ablation at layer 1 each give
  transformers' greedy ids with the same program hooked at ``blocks.L.hook_resid_post``
  (:func:`steering.hf.hf_steering`), and logprobs within ``LOGPROB_TOL``;
* steered and unsteered requests in one batch give what each gives alone.
Gemma 2 also serves a Gemma Scope–format SAE (SAELens layout, JumpReLU) imported with
``steer pack import-saelens``, whose latent clamp equals the reference, and a pack with a lowrank
(LoReFT) and a multi-layer feature, which equal the reference too; Qwen3-MoE runs with tensor
parallel 2 too.

Which families run: ``CI_FAMILIES`` by default, ``STEER_TEST_FAMILIES`` (``all`` or a comma
list) otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steering.config import SteeringConfig
from steering.hf import hf_decoder_layers
from steering.request import SteeringCompiler
from tests.conftest import API_KEY, REPO_ROOT, start_server
from tests.steering.tiny_models import D, FAMILIES, N_LAYERS, build

LOGPROB_TOL = 1e-3
"""Stated tolerance: |vLLM − transformers| per sampled token's logprob, float32."""
N_TOKENS = 8
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "The best way to learn programming is", "My favourite food is"]
SAE_LAYER, SAE_LATENT, D_SAE = 1, 5, 64
TP_FAMILY = "qwen3_moe"

CI_FAMILIES = ("gemma2", "qwen3_moe", "granite", "olmo2")
"""Run by default (CI time): one family per site shape the main suite's SmolLM2 (Llama) leaves
out — Gemma's post-norms (+ the SAE), MoE (+ tensor parallel), a one-tensor vLLM layer, the
Transformers backend. ``STEER_TEST_FAMILIES=all`` runs every family of ``FAMILIES``."""
_only = os.environ.get("STEER_TEST_FAMILIES", ",".join(CI_FAMILIES))
TESTED = tuple(f for f in FAMILIES if _only == "all" or f in _only.split(","))


# -- the reference --------------------------------------------------------------------------
class Family:
    """One family's tiny model: its folder, the transformers model, its serving engine."""

    def __init__(self, name: str, folder: Path, server=None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.folder, self.server = name, folder, server
        self.hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.norms = [float(self.streams(L).norm(dim=-1).median()) for L in range(N_LAYERS)]

    def streams(self, layer: int) -> torch.Tensor:
        """``blocks.L.hook_resid_post`` [tokens, d] over the prompts (the layer's own output:
        transformers' last ``hidden_states`` entry is after the final norm)."""
        got = []

        def hook(_m, _i, out):
            got.append((out[0] if isinstance(out, tuple) else out)[0])

        h = hf_decoder_layers(self.hf)[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                for p in PROMPTS:
                    self.hf(torch.tensor([self.tok.encode(p)]))
        finally:
            h.remove()
        return torch.cat(got)

    def mean_direction(self, layer: int) -> np.ndarray:
        """The unit mean of the stream at ``layer`` over the prompts: ablating it changes outputs."""
        m = self.streams(layer).mean(0).numpy()
        return m / np.linalg.norm(m)

    def unit(self, seed: int) -> np.ndarray:
        v = np.random.default_rng(seed).standard_normal(D)
        return v / np.linalg.norm(v)

    def reference(self, prompt_ids: list[int], steering: dict | None,
                  feature_source=None) -> tuple[list[int], np.ndarray]:
        """transformers' greedy ids and their logprobs, steered by ``steering`` through hooks."""
        from contextlib import nullcontext

        from steering.hf import hf_steering

        ctx = nullcontext()
        if steering is not None:
            program = SteeringCompiler(SteeringConfig(), D, N_LAYERS,
                                       feature_source=feature_source).compile(steering).program
            ctx = hf_steering(self.hf, program)
        n, p = N_TOKENS, len(prompt_ids)
        with torch.no_grad(), ctx:
            out = self.hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=2)
            logits = self.hf(out).logits[0, p - 1 : -1].float()
        ids = out[0, p:].tolist()
        lp = torch.log_softmax(logits, -1)[torch.arange(n), out[0, p:]].numpy()
        return ids, lp


def steerings(fam: Family) -> dict[str, dict]:
    """An add at the last layer, a clamp at layer 0, an ablation at layer 1 (norms sized to the
    model's stream: well inside the server's bound, large enough to change the output)."""
    n = fam.norms
    return {
        "add": {"vectors": [{"layer": N_LAYERS - 1, "values": (fam.unit(1) * 2.0 * n[-1]).tolist()}]},
        "clamp": {"vectors": [{"layer": 0, "values": fam.unit(2).tolist(), "mode": "clamp",
                               "target": 1.5 * n[0]}]},
        "ablate": {"vectors": [{"layer": 1, "values": fam.mean_direction(1).tolist(),
                                "mode": "ablate"}]},
    }


# -- the engine -----------------------------------------------------------------------------
def complete(fam: Family, prompt: str, steering: dict | None = None, srv=None) -> dict:
    import httpx

    srv = srv or fam.server
    body = {"model": str(fam.folder), "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0.0,
            "return_token_ids": True, "logprobs": 1}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300,
                   headers={"authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def ids_lp(resp: dict) -> tuple[list[int], np.ndarray]:
    ch = resp["choices"][0]
    return ch["token_ids"], np.asarray(ch["logprobs"]["token_logprobs"])


async def _batch(fam: Family, jobs) -> list[list[int]]:
    loop = asyncio.get_running_loop()
    return [ids_lp(r)[0] for r in await asyncio.gather(
        *(loop.run_in_executor(None, complete, fam, p, s) for p, s in jobs))]


def serve_args(folder: Path, *extra: str) -> tuple[str, ...]:
    return ("--model", str(folder), "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--no-enable-prefix-caching", "--max-steering-slots", "4",
            "--api-key", API_KEY, *extra)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _tokenizer_dir() -> Path:
    from steering.model_store import resolve_model

    return resolve_model(None)


def saelens_sae(fam: Family, dest: Path) -> Path:
    """A Gemma Scope–format SAE for ``fam`` (SAELens layout: JumpReLU with a threshold), its
    encoder built from the model's own streams so latent ``SAE_LATENT`` fires on the prompts."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    W_dec = rng.standard_normal((D_SAE, D)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_dec[SAE_LATENT] = fam.mean_direction(SAE_LAYER)
    W_enc = W_dec.T.copy()  # [d_in, d_sae]
    threshold = np.full(D_SAE, 0.1 * fam.norms[SAE_LAYER], dtype=np.float32)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": np.zeros(D_SAE, np.float32),
               "b_dec": np.zeros(D, np.float32), "threshold": threshold},
              str(dest / "sae_weights.safetensors"))
    (dest / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": D, "d_sae": D_SAE, "dtype": "float32",
        "model_name": f"tiny-{fam.name}", "hook_name": f"blocks.{SAE_LAYER}.hook_resid_post",
        "hook_layer": SAE_LAYER, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "neuronpedia_id": f"tiny-{fam.name}/{SAE_LAYER}-gemmascope-res-{D_SAE}"}))
    return dest


def import_pack(sae_dir: Path, model_dir: Path, out: Path) -> Path:
    """``steer pack import-saelens`` as a user runs it."""
    cmd = [sys.executable, "-m", "clients.cli", "pack", "import-saelens", str(sae_dir), "--out",
           str(out), "--model", str(model_dir), "--name", "tiny-scope", "-q"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def kinds_pack(fam: Family, out: Path) -> Path:
    """A pack ``tiny-kinds`` for ``fam`` with a lowrank feature ``lora`` (rank 2 at layers 0 and
    2, read out at 0) and a multi-layer direction ``multi`` (every layer, read out at 1), sized
    to the model's stream so that strength 1 changes the output."""
    from steering.packs import PackWriter, model_fingerprint

    rng = np.random.default_rng(28)
    w = PackWriter("tiny-kinds", "0.1.0", model_fingerprint(fam.folder))
    layers = [0, N_LAYERS - 1]
    R = np.stack([np.linalg.qr(rng.standard_normal((D, 2)))[0].T for _ in layers])  # [2, 2, d]
    b = np.stack([rng.standard_normal(2) * fam.norms[L] for L in layers])  # [2, 2]
    w.add_feature("lora", layer=0, kind="lowrank", direction=R[0, 0], layers=layers,
                  lowrank={"R": R, "W": rng.standard_normal((2, 2, D)) * 0.05, "b": b},
                  calibration={"scale": 1.0})
    units = np.stack([fam.unit(30 + L) for L in range(N_LAYERS)])  # [n, d]
    w.add_feature("multi", layer=1, kind="direction", direction=units[1], layers=range(N_LAYERS),
                  directions=units * np.array([[1.0], [0.5], [2.0]]),
                  calibration={"scale": 1.5 * fam.norms[1]})
    return w.write(out)


@pytest.fixture(scope="module", params=TESTED)
def fam(request, tiny_root):
    folder = build(request.param, tiny_root / request.param, _tokenizer_dir())
    family = Family(request.param, folder)
    extra: tuple[str, ...] = ()
    if request.param == "gemma2":
        sae = saelens_sae(family, tiny_root / "gemma-scope-sae")
        family.pack = import_pack(sae, folder, tiny_root / "tiny-scope")
        family.kinds_pack = kinds_pack(family, tiny_root / "tiny-kinds")
        extra = ("--feature-pack", str(family.pack), "--feature-pack", str(family.kinds_pack))
    with start_server(serve_args(folder, *extra)) as srv:
        family.server = srv
        yield family


# -- the tests --------------------------------------------------------------------------------
def test_unsteered_equals_transformers(fam):
    for prompt in PROMPTS[:2]:
        resp = complete(fam, prompt)
        got, lp = ids_lp(resp)
        want, ref_lp = fam.reference(resp["prompt_token_ids"], None)
        assert got == want, prompt
        assert np.max(np.abs(lp - ref_lp)) < LOGPROB_TOL


@pytest.mark.parametrize("kind", ["add", "clamp", "ablate"])
def test_steering_equals_transformers_hooks(fam, kind):
    steer = steerings(fam)[kind]
    resp = complete(fam, PROMPTS[0], steer)
    got, lp = ids_lp(resp)
    want, ref_lp = fam.reference(resp["prompt_token_ids"], steer)
    assert got == want
    assert np.max(np.abs(lp - ref_lp)) < LOGPROB_TOL, np.abs(lp - ref_lp)
    # the steering is real: the reference itself moves
    _, plain_lp = fam.reference(resp["prompt_token_ids"], None)
    assert np.max(np.abs(plain_lp - ref_lp)) > 20 * LOGPROB_TOL


def test_mixed_batch_stays_isolated(fam):
    s = steerings(fam)
    jobs = [(PROMPTS[0], None), (PROMPTS[1], s["add"]), (PROMPTS[2], s["clamp"]),
            (PROMPTS[3], None), (PROMPTS[0], s["ablate"]), (PROMPTS[1], None)]
    solo = [ids_lp(complete(fam, p, c))[0] for p, c in jobs]
    assert asyncio.run(_batch(fam, jobs)) == solo


def test_gemma_scope_sae_latent_clamp_end_to_end(fam):
    if fam.name != "gemma2":
        pytest.skip("the Gemma Scope–format SAE is built for the tiny Gemma 2")
    from steering.packs.registry import PackRegistry

    name = f"tiny-scope/L{SAE_LAYER}:{SAE_LATENT}"
    steer = {"features": {name: {"mode": "clamp", "strength": 3.0}}}
    resp = complete(fam, PROMPTS[1], steer)
    got, lp = ids_lp(resp)
    packs = PackRegistry.from_paths([str(fam.pack)], str(fam.folder))
    program = SteeringCompiler(SteeringConfig(), D, N_LAYERS, feature_source=packs).compile(steer).program
    assert list(program.layers) == [SAE_LAYER] and program.layers[SAE_LAYER].num_entries == 1
    want, ref_lp = fam.reference(resp["prompt_token_ids"], steer, feature_source=packs)
    assert got == want
    assert np.max(np.abs(lp - ref_lp)) < LOGPROB_TOL
    _, plain_lp = fam.reference(resp["prompt_token_ids"], None)
    assert np.max(np.abs(plain_lp - ref_lp)) > 20 * LOGPROB_TOL


def test_lowrank_and_multilayer_features_equal_transformers(fam):
    """Issue #28 in the engine: a lowrank feature at strength 0 is the unsteered output; at
    strength 1 (and ablated), and a multi-layer direction feature, give transformers' greedy ids
    under the same program hooked at each of their layers."""
    if fam.name != "gemma2":
        pytest.skip("the lowrank and multi-layer pack is built for the tiny Gemma 2")
    from steering.packs.registry import PackRegistry

    packs = PackRegistry.from_paths([str(fam.kinds_pack)], str(fam.folder))
    plain = ids_lp(complete(fam, PROMPTS[1]))[0]
    assert ids_lp(complete(fam, PROMPTS[1], {"features": {"tiny-kinds/lora": 0.0}}))[0] == plain
    for steer in ({"features": {"tiny-kinds/lora": 1.0}},
                  {"features": {"tiny-kinds/lora": {"mode": "ablate"}}},
                  {"features": {"tiny-kinds/multi": 1.0}}):
        resp = complete(fam, PROMPTS[1], steer)
        got, lp = ids_lp(resp)
        want, ref_lp = fam.reference(resp["prompt_token_ids"], steer, feature_source=packs)
        assert got == want, steer
        assert np.max(np.abs(lp - ref_lp)) < LOGPROB_TOL, steer
        _, plain_lp = fam.reference(resp["prompt_token_ids"], None)
        assert np.max(np.abs(plain_lp - ref_lp)) > 20 * LOGPROB_TOL, steer  # the steering is real
    applied = complete(fam, PROMPTS[1], {"features": {"tiny-kinds/lora": 1.0}})["steering"]["applied"]
    assert applied == [{"feature": "tiny-kinds/lora", "layer": 0, "layers": [0, N_LAYERS - 1],
                        "mode": "add", "strength": 1.0}]


def test_tensor_parallel_new_family_steers_identically(fam):
    if fam.name != TP_FAMILY:
        pytest.skip(f"tensor parallel is checked on {TP_FAMILY}")
    s = steerings(fam)
    jobs = [(PROMPTS[0], s["add"]), (PROMPTS[1], None), (PROMPTS[2], s["clamp"])]
    want = [ids_lp(complete(fam, p, c))[0] for p, c in jobs]
    with start_server(serve_args(fam.folder, "--tensor-parallel-size", "2")) as tp2:
        assert [ids_lp(complete(fam, p, c, srv=tp2))[0] for p, c in jobs] == want
