"""Feature packs: the on-disk format, the registry (a FeatureSource), builders and importers.

    from steering.packs import PackRegistry, model_fingerprint
    reg = PackRegistry.from_paths(["feature_packs"], model_dir)   # verified against the model
    reg.resolve("formality")            # → steering.features.Feature (bare or "pack/name")
    reg.features(tag="tone"); reg.search("bridge"); reg.encode(12, h)

See steering/packs/README.md for the format, calibration units and the CLI.
"""

from steering.packs.format import (
    FEATURES_FILE, MANIFEST_FILE, SAE, SAE_FILE, SAE_LABELS_FILE, SCHEMA_VERSION, Pack, PackError,
    PackWriter, load_pack, model_fingerprint, validate_pack,
)
from steering.packs.registry import PackRegistry, bundled_packs_dir, discover_packs

__all__ = [
    "FEATURES_FILE", "MANIFEST_FILE", "SAE", "SAE_FILE", "SAE_LABELS_FILE", "SCHEMA_VERSION",
    "Pack", "PackError", "PackRegistry", "PackWriter", "bundled_packs_dir", "discover_packs",
    "load_pack", "model_fingerprint", "validate_pack",
]
