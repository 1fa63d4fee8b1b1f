"""Agent (c): deceptive path planning with a GraphSAGE policy trained by PPO, next to the classical baselines.

Fatemi, Suttle and Sadler, AAMAS 2024 ("Deceptive Path Planning via Reinforcement Learning with Graph Neural
Networks"): an agent walks a 4-connected grid towards its true goal while an observer, who also knows a decoy goal,
infers the goal from the path.

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
  network.py    the GraphSAGE actor-critic over the dense padded ego-graph (mean aggregation, masked move logits)
  learner.py    PPO on the RL harness with the running goal-reach rate as the bonus's curriculum coefficient
  evaluation.py the policy's greedy paths on padded map sets; the policy, honest and pi_d4 under one observer
  planning.py   the trained policy saved with its run and loaded back to plan on any map
  plots.py      paths on a map next to the observer's posterior of the true goal along each path
  experiment.py `jaxalign run deceptive_paths`: train, then the tables, budget curve, moved decoy, throughput

`jaxalign deceptive-paths plan MAP.txt --checkpoint DIR` (launch/deceptive_paths.py) plans on a user's map.
"""
