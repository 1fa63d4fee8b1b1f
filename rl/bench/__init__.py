"""Benchmarks of the RL core (registered in launch/cli.py BENCHMARKS)."""
