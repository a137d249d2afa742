"""The contrastive builder's layer choice (steering.builders.contrastive.fit_concept) when the
pairs are noise: a workshop feature made from poorly generated data must still get a layer (the
one that separates its held-out pairs least badly), not a crash."""

from __future__ import annotations

import numpy as np

from steering.builders.contrastive import fit_concept


def test_pairs_that_separate_backwards_on_held_out_still_get_the_least_bad_layer():
    n, d = 8, 16
    held = np.random.default_rng(0).permutation(n)[:2]  # fit_concept's held-out rows (seed 0)
    noise = np.random.default_rng(1).normal(scale=0.05, size=(2, n, d))
    pos, neg = {}, {}
    for layer, gap in ((6, 1.0), (8, 0.3)):  # train rows: pos above neg along e0; held out: reversed
        sign = np.ones(n)
        sign[held] = -1.0
        e0 = np.eye(d)[0]
        pos[layer] = np.outer(sign * gap, e0) + noise[0]
        neg[layer] = -np.outer(sign * gap, e0) + noise[1]
    fit = fit_concept({"heldout": 0.25}, {"name": "noise"}, pos, neg, seed=0)
    scan = {int(k): v["d_prime"] for k, v in fit["layer_scan"].items()}
    assert all(v < 0 for v in scan.values()), scan
    assert fit["layer"] == max(scan, key=scan.get)
