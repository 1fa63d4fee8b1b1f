"""Agent (c), first increment: grid maps, the functional environment, the observer, baselines and metrics.

Fatemi, Suttle and Sadler, AAMAS 2024 ("Deceptive Path Planning via Reinforcement Learning with Graph Neural
Networks"): an agent walks a 4-connected grid towards its true goal while an observer, who also knows a decoy goal,
infers the goal from the path. This package holds everything but the learner:

  maps.py       the text map format (# . S G D), BFS distances, padded graph arrays, random solvable maps and the
                shipped map sets under data/ (train/test 8x8 and 16x16, unseen 24x24 and 32x32)
  env.py        DeceptivePathEnv: jittable, vmappable, ego-graph observations of radius k, masked moves,
                goal / timeout rewards and the exaggeration or ambiguity deception bonus
  observer.py   P(goal | path): cost-difference goal recognition (Ramirez and Geffner 2010 as used by Masters and
                Sardina 2017) and the value-difference form of the exaggeration bonus
  baselines.py  the honest shortest path and Masters and Sardina's pi_d1 and pi_d4 through the last deceptive point
  metrics.py    goal reached, deceptive-step fraction, the step the true goal becomes most probable for good,
                path length over budget
  throughput.py environment steps per second of the vmapped environment under random masked actions

GraphSAGE, PPO training and the command line are not built yet.
"""
