"""The offline pack builders behind ``steer pack``: contrastive directions (:mod:`.contrastive`),
trained vectors and low-rank edits (:mod:`.train`, :mod:`.trained`), SAEs (:mod:`.sae`,
:mod:`.sae_train`, :mod:`.sae_label`), importers (:mod:`.importers`), and the data they use
(:mod:`.collect`, :mod:`.corpora`, :mod:`.calibration`). They write packs with
:mod:`steering.packs` and never import the worker side (an import-linter contract)."""
