"""Presets (named steering configs) and A/B experiments over them.

``store``    persistence behind :class:`ExperimentStore`: SQLite (default) with versioned migrations;
``postgres`` the PostgreSQL backend of the same interface and migrations (``--experiments-db``).
``assign``   deterministic, sticky variant assignment.
``models``   the typed domain objects (presets, variants, experiments, admin bodies, presets file).
``presets``  the presets file and the stored presets; ``routing`` a request through presets and
             experiments (``<base>:<preset>``, ``<base>:exp/NAME``, ``steering.experiment``);
``recording`` exposures and their Prometheus counters; ``writer`` the store's one thread and its
             bounded queue; ``manager`` the facade over them all.
``stats``    per-variant results, Welch t-test, two-proportion z-test, Wilson CI, sample-ratio check.
``routes``   the admin API; ``cli`` the ``steer ab`` command (``results``, ``--plot`` via ``plot``,
             ``run``: the offline A/B of ``offline``, rendered by ``offline_report``).
"""
