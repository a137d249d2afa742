"""Presets (named steering configs) and A/B experiments over them.

``store``   SQLite persistence behind :class:`ExperimentStore` (versioned migrations).
``assign``  deterministic, sticky variant assignment.
``manager`` in-memory registry + request routing (``<base>:<preset>``, ``steering.experiment``).
``stats``   per-variant results, Welch t-test, two-proportion z-test, sample-ratio check.
``routes``  the admin API; ``cli`` the ``steer ab`` command.
"""
