"""Reference runs of the RL core (registered in launch/experiments.py)."""
