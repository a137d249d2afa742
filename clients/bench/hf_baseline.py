"""The usual alternative: transformers ``generate()`` with forward hooks applying the same steering.

The steering is S2's (the same additive vector at every layer, through :func:`steering.hf.hf_steering`,
the reference our op is tested against); the batch is left-padded, greedy, and every row generates
exactly ``tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), so tok/s compares with the
engine's S2 run at the same batch size.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from clients.bench.prompts import prompts


class HFSteered:
    """transformers ``generate()`` with S2's steering applied by forward hooks, ready to time."""

    def __init__(self, model_dir: str, batch: int, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from steering.config import SteeringConfig
        from steering.request import SteeringCompiler

        self.batch, self.dtype = batch, dtype
        self.tok = tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        d, n_layers = self.model.config.hidden_size, self.model.config.num_hidden_layers
        comp = SteeringCompiler(SteeringConfig(), d, n_layers)
        v = np.random.default_rng(0).standard_normal(d)
        self.program = comp.compile({"vectors": [{"layer": L, "values": v.tolist(), "scale": 4.0 / n_layers}
                                                 for L in range(n_layers)]}).program
        self.enc = tok(prompts(batch), return_tensors="pt", padding=True)

    def tok_s(self, n: int) -> float:
        """Generated tokens per second of one batch run of exactly ``n`` new tokens per row."""
        from steering.hf import hf_steering

        threads = torch.get_num_threads()
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else (os.cpu_count() or 1))
        try:
            t0 = time.perf_counter()
            with torch.inference_mode(), hf_steering(self.model, self.program):
                out = self.model.generate(**self.enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            dt = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        new = out.shape[1] - self.enc["input_ids"].shape[1]
        if new != n:
            raise RuntimeError(f"generated {new} tokens per row, expected {n}")
        return self.batch * n / dt


def run_hf_baseline(model_dir: str, batch: int, tokens: int, repeats: int, dtype: str = "float32",
                    log=print) -> dict[str, Any]:
    hf = HFSteered(model_dir, batch, dtype)
    hf.tok_s(2)  # warm-up
    samples = [hf.tok_s(tokens) for _ in range(repeats)]
    res = {"dtype": dtype, "batch": batch, "tokens": tokens, "tok_s": statistics.median(samples),
           "samples": samples}
    log(f"transformers+hooks ({dtype}) batch {batch}: {res['tok_s']:.1f} tok/s")
    del hf
    return res
