"""Steering vs prompting: one feature's three conditions side by side (``steer eval --baseline prompt``).

Per condition — ``steer`` (the feature at ``baseline_strength``), ``prompt`` (no steering; a system
message asks for the concept), ``both`` — against the same unsteered outputs (strength 0, same
prompts and seeds):

* ``score_mean`` and the paired test ``vs_baseline`` (:func:`server.stats.paired_wilcoxon`);
* ``ppl_ratio``: median perplexity under the unsteered model (after the neutral prompt) over the
  unsteered outputs' median;
* an AxBench-style trade-off (Wu et al., 2025, "AxBench": the harmonic mean of concept score and
  fluency, so a condition must do both to score): ``concept`` = share of prompts whose mean score
  rose above that prompt's unsteered score (ties count 0: no change is no concept), ``fluency`` =
  share of outputs whose perplexity stays within ``PPL_RATIO_MAX`` × the unsteered median, and
  ``harmonic`` = 2·c·f / (c + f) (0 when both are 0). All three are in [0, 1].

``best`` names the condition with the highest harmonic mean (ties: the first of steer, prompt, both).
"""

from __future__ import annotations

from typing import Any

from clients.eval.bar import PPL_RATIO_MAX
from clients.eval.harness import BOTH, PROMPT, STEER, EvalConfig, Sample
from clients.eval.scorers import SCORERS
from server.stats import finite_values, mean_ci, paired_wilcoxon, per_prompt_means, percentile

CONDITIONS = (STEER, PROMPT, BOTH)


def harmonic(concept: float | None, fluency: float | None) -> float | None:
    """2cf / (c + f); 0 when both are 0; None when either is missing."""
    if concept is None or fluency is None:
        return None
    return 0.0 if concept + fluency == 0 else 2 * concept * fluency / (concept + fluency)


def tradeoff(means: dict[str, float], base: dict[str, float], ppls: list[float],
             base_ppl: float | None) -> dict[str, float | None]:
    """``concept``, ``fluency`` and their ``harmonic`` mean (the module docstring) from per-prompt
    mean scores, the unsteered per-prompt means, the finite perplexities and the unsteered median."""
    paired = [pid for pid in means if pid in base]
    concept = (sum(means[pid] > base[pid] for pid in paired) / len(paired)) if paired else None
    fluency = (sum(p <= PPL_RATIO_MAX * base_ppl for p in ppls) / len(ppls)) if (ppls and base_ppl) else None
    return {"concept": concept, "fluency": fluency, "harmonic": harmonic(concept, fluency)}


def _prompt_means(rows: list[Sample], scorer: str) -> dict[str, float]:
    """Prompt id → mean ``scorer`` score of its samples in ``rows``."""
    by_prompt: dict[str, list[float]] = {}
    for s in rows:
        by_prompt.setdefault(s.prompt_id, []).append(s.scores[scorer])
    return per_prompt_means(by_prompt)


def _condition(rows: list[Sample], scorer: str, base: dict[str, float], base_ppl: float | None,
               seed: int) -> dict[str, Any]:
    pm = _prompt_means(rows, scorer)
    mean, lo, hi = mean_ci(finite_values(pm.values()))
    ppls = finite_values([s.perplexity for s in rows])
    med = percentile(ppls, 50)
    paired = any(pid in base for pid in pm)
    return {
        "n_prompts": len(pm), "score_mean": mean, "score_ci95": [lo, hi],
        "vs_baseline": paired_wilcoxon(pm, base, seed=seed) if paired else None,
        "ppl_median": med, "ppl_ratio": (med / base_ppl) if (med is not None and base_ppl) else None,
        **tradeoff(pm, base, ppls, base_ppl),
    }


def compare_with_prompting(feature: str, scorer: str, cfg: EvalConfig, samples: list[Sample],
                           seed: int = 0) -> dict[str, Any]:
    """The three conditions of ``feature`` (see the module docstring)."""
    budget = cfg.max_tokens_for(feature)
    unsteered = [s for s in samples if s.feature is None and s.condition == STEER and s.max_tokens == budget]
    base = _prompt_means(unsteered, scorer)
    base_ppl = percentile(finite_values([s.perplexity for s in unsteered]), 50)
    rows = {
        STEER: [s for s in samples if s.feature == feature and s.condition == STEER
                and s.strength == cfg.baseline_strength],
        PROMPT: [s for s in samples if s.feature == feature and s.condition == PROMPT],
        BOTH: [s for s in samples if s.feature == feature and s.condition == BOTH],
    }
    out: dict[str, Any] = {
        "strength": cfg.baseline_strength, "instruction": SCORERS[scorer].instruction,
        "conditions": {name: _condition(rows[name], scorer, base, base_ppl, seed) for name in CONDITIONS},
    }
    scored = [(c, out["conditions"][c]["harmonic"]) for c in CONDITIONS
              if out["conditions"][c]["harmonic"] is not None]
    out["best"] = max(scored, key=lambda x: x[1])[0] if scored else None
    return out
