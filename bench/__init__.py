"""Steering benchmarks: `steer bench` (bench/run.py) and the op-level GPU check (bench/gpu_op.py)."""
