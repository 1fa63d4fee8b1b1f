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
"""
