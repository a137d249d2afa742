"""Feature packs: the on-disk format and the registry (a FeatureSource) — the request-side core's
view of packs. Builders and importers that write packs are :mod:`steering.builders`.

    from steering.packs import PackRegistry, model_fingerprint
    reg = PackRegistry.from_paths(["feature_packs"], model_dir)   # verified against the model
    reg.resolve("formality")            # → steering.features.Feature (bare or "pack/name")
    reg.features(tag="tone"); reg.search("bridge"); reg.encode(12, h)

Modules: ``manifest`` (the typed pack.json), ``tensors`` (sha256, safetensors, model
fingerprint), ``format`` (load_pack, Pack, SAE), ``writer`` (PackWriter), ``registry``. See
steering/packs/README.md for the format, calibration units and the ``steer pack`` CLI.
"""

from steering.packs.format import SAE, Pack, load_pack, validate_pack
from steering.packs.manifest import FEATURES_FILE, MANIFEST_FILE, PackError, PackManifest
from steering.packs.registry import PackRegistry, bundled_packs_dir, discover_packs
from steering.packs.tensors import model_fingerprint
from steering.packs.writer import PackWriter

__all__ = [
    "FEATURES_FILE", "MANIFEST_FILE", "SAE", "Pack", "PackError", "PackManifest", "PackRegistry",
    "PackWriter", "bundled_packs_dir", "discover_packs", "load_pack", "model_fingerprint",
    "validate_pack",
]
