"""Steering benchmarks: `steer bench` (clients/bench/run.py) and the op-level GPU check (clients/bench/gpu_op.py)."""
