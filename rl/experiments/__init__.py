"""Reference runs of the RL core (registered in jaxalign/registry.py)."""
