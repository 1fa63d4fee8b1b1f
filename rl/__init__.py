"""Reinforcement-learning core shared by jaxalign's agents (functional environments, PPO, DQN, distributional ops).

Empty so far: the RL core is the subject of its own issue and lands in later increments.
"""
