"""Per-request activation steering for vLLM, in three parts by job (import-linter contracts in
pyproject.toml keep them apart):

- the request-side core (this package's modules and :mod:`steering.packs`): the steering spec,
the compiler, programs, the wire record, features and the pack format;
- :mod:`steering.worker`: what runs in vLLM's workers (the shim, the batched op, slots, readouts);
- :mod:`steering.builders`: the offline pack builders behind ``steer pack``.
"""

from steering.config import SteeringConfig

__all__ = ["SteeringConfig"]
