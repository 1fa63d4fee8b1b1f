"""Agent (d), first increment: the job-shop substrate for dispatching learned on a CP model.

Tassel, Gebser and Schekotihin, ICAPS 2023, "An End-to-End Reinforcement Learning Approach for Job-Shop Scheduling
Problems Based on Constraint Programming". This increment builds everything but the learned agent:

  instances.py    Instance; Taillard and OR-Library formats (read, write, detect); Taillard's 1993 generator with
                  the published seeds; ta01-ta80 shipped under data/taillard/ with the best-known bounds
                  (`benchmark`); random Taillard-style training instances (NumPy seed or JAX key)
  env.py          the jittable, vmappable event-driven non-delay environment (No-Op, windows of 5 operations,
                  machine-competition mask, padding across sizes)
  schedule.py     `validate` (every violated constraint), `simulate` (plain-Python replay of decisions),
                  `semi_active` (earliest schedule for given machine orders)
  brute_force.py  exact optima of tiny instances by machine orders and by decision sequences
  rules.py        SPT, LPT, MWKR, MOR, FIFO as JAX priority functions; jitted, vmapped `dispatch`
  cpsat.py        the CP-SAT model (intervals, no-overlap, precedence) with time limit, workers and a hint

The second increment, the learned agent:

  network.py      the size-agnostic policy: attention over each job's window, then across jobs (competition bias)
  imitation.py    CP-SAT schedules -> left-shifted -> expert decisions (replayed and checked); behaviour cloning
  ppo.py          PPO on the makespan (rl.ppo's loss, rl.returns' GAE) as an rl.harness Trainer
  inference.py    greedy and best-of-N rollouts (greedy + N-1 sampled at 0.5-2.0), validated; the policy on disk
  experiment.py   `jaxalign run jssp_cp`: imitation, PPO, evaluation on held-out and Taillard instances
  bench.py        `jaxalign bench jssp`: every method per Taillard size group
  plots.py        Gantt charts
"""
