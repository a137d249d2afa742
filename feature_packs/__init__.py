"""The bundled data of steer-server, shipped as package data: the feature packs for
SmolLM2-135M-Instruct (``smollm2-tone/``, ``smollm2-sae-l12/``), the named presets
(``presets.yaml``) and the recipes that rebuild the packs (``recipes/``). See ``README.md``.

No code lives here; locate the folder with ``steering.packs.bundled_packs_dir()``.
"""
