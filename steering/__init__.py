"""Per-request activation steering for vLLM: schema, compiled programs, slot tables, the batched op."""

from steering.config import SteeringConfig

__all__ = ["SteeringConfig"]
