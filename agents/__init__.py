"""The four RL agents (distributional DP with stock augmentation, PDPPO, GNN deceptive path planning, CP job-shop).

Empty so far: each agent is the subject of its own issue and lands in later increments.
"""
