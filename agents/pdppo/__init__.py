"""Agent (b): PDPPO with dual critics on stochastic lot-sizing, against PPO, a base-stock rule and, on a tiny
instance, the exact optimum.

Felizardo et al. 2025, "Post-Decision Proximal Policy Optimization with Dual Critic Networks". A period of the
lot-sizing problem splits into a deterministic post-decision step (setups and production) and a stochastic exogenous
step (demand, lost sales, holding); PDPPO learns V(s) and V_post(s^x) and uses min(V(s), V_post(s^x)) in the
advantage.

  instances.py   Instance (items, machines, costs, rates, cap, demand law, horizon), the generator of the named
                 configurations 15i5m ... 30i15m, JSON save/load with one clear error per bad file
  env.py         the functional JAX env: post_decision / exogenous / step, observations, the rl/env.py protocol
                 (LotSizing, MultiDiscrete actions), episode_cost
  reference.py   the plain NumPy reading of one period (the independent check)
  heuristic.py   the base-stock rule and policy evaluation over held-out demand seeds (mean, 95 % interval)
  exact.py       the tiny instance's full tabular model and its optimal policy by backward induction
  throughput.py  env steps/s of the jitted vmapped env vs the NumPy reference step
  learners.py    PPO and PDPPO (one learner, the critic is the only difference) for rl.harness; the authors'
                 two confounds behind one flag (`confounded`), the critic combination as a function (`combine`),
                 the critics' loss (`critic_loss`: the paper's minimum, or each critic on its own)
  critics.py     what trained critics and policies do: which critic PDPPO trained, the critics' errors, the
                 baseline's dependence on the action (in results.json and `diagnose.py`)
  experiment.py  `jaxalign run pdppo_lot_sizing`: both arms per seed from one initialisation, on the harness;
                 held-out evaluation with intervals over seeds, the base-stock rule, the exact optimum on `tiny`
  bench.py       `jaxalign bench pdppo`: 15i5m, 20i10m, 25i15m (and tiny) in one CSV / markdown table
  diagnose.py    `python -m agents.pdppo.diagnose RUN`: critics.py's diagnosis of any finished run
"""
