"""Everything that drives a server or an engine from outside: the ``steer`` command line and its
tools (``eval``, ``demo``, ``ab``, ``bench``), and the launcher that starts ``steer serve`` for them.

Dependencies flow one way: ``clients`` → ``server`` → ``steering`` (tests/test_architecture.py)."""
