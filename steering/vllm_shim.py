"""The public name of the vLLM worker shim: what ``--worker-cls steering.vllm_shim.SteeringCPUWorker``
(or ``…GPUWorker``) and the ``vllm.general_plugins`` entry point (``steering.vllm_shim:register``)
name, kept stable for users' command lines. The code is :mod:`steering.worker.vllm_shim`; this
module belongs to the worker side (it is not part of the request-side core)."""

from __future__ import annotations

from typing import Any

from steering.worker import vllm_shim as _shim
from steering.worker.vllm_shim import register  # noqa: F401  (the entry point)


def __getattr__(name: str) -> Any:
    # SteeringCPUWorker / SteeringGPUWorker are built on first use by the shim itself.
    return getattr(_shim, name)
