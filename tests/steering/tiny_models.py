"""Tiny random-weight models of each decoder family, built and saved by transformers (no hub).

Every model uses the bundled SmolLM2 tokenizer (so its vocabulary is 49152), d = 128, 3 layers,
float32 weights. ``build(family, dest)`` writes a Hugging Face folder vLLM and transformers load
alike. Weights are drawn with a larger spread than transformers' default (``INIT_STD``) so the
greedy choice has clear margins: a random model whose logits are all near-equal would make the
token-for-token comparison a coin toss between two numerically different kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

D = 128
"""hidden_size of every tiny model."""
N_LAYERS = 3
VOCAB = 49152
"""The bundled SmolLM2 tokenizer's vocabulary."""
INIT_STD = 0.08
"""Std of the random weights (transformers' default 0.02 gives near-uniform logits)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_COMMON = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=256, num_hidden_layers=N_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               initializer_range=INIT_STD, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=2)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=32)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=True)
    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)
    if family == "gemma2":
        return tf.Gemma2Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=32,
                               query_pre_attn_scalar=32, sliding_window=64,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               hidden_activation="gelu_pytorch_tanh")
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=32,
                                   query_pre_attn_scalar=32, sliding_window=64,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention"])
    if family == "phi3":
        return tf.Phi3Config(**_COMMON)
    if family == "granite":
        return tf.GraniteConfig(**_COMMON, residual_multiplier=0.5, embedding_multiplier=4.0,
                                attention_multiplier=0.2, logits_scaling=2.0)
    if family == "olmo2":
        return tf.Olmo2Config(**_COMMON)
    if family == "gpt_oss":
        return tf.GptOssConfig(**_COMMON, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=64)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3",
            "phi3", "granite", "olmo2", "gpt_oss")


def build(family: str, dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model (float32) with the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM

    cfg = _config(family)
    cfg.torch_dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms stay at their init (ones, or zeros for Gemma's 1 + w)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, INIT_STD)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest
