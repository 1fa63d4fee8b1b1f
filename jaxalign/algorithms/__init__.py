"""Algorithms that compose models, objectives and training steps (reward models, iterative and online methods)."""
