"""Reinforcement-learning core shared by jaxalign's agents: functional environments and the learners built on them.

    env.py            the functional environment protocol (reset/step as pure functions, params apart from state)
                      and its spaces (Discrete, Box)
    envs/             JAX environments: CartPole (step-for-step gymnasium's CartPole-v1)
    wrappers.py       AutoReset, EpisodeStats; GymnasiumEnv / register_gymnasium (JAX -> gymnasium) and
                      GymnasiumDriver (gymnasium envs stepped on the host by a JAX policy)
    rollout.py        Transition, lax.scan rollouts over vmapped environments, evaluation episodes
    returns.py        GAE and Monte-Carlo returns with termination / truncation handling
    networks.py       MLP torsos, actor-critic, Q and distributional Q heads
    ppo.py            PPO: ppo_loss, make_ppo / make_train (one jitted scan, vmappable over seeds)
    replay.py         a uniform replay buffer as a pytree
    dqn.py            DQN / double DQN: targets, loss, make_learner (environment-independent), make_dqn / make_train
    distributional.py C51 categorical projection, quantile-regression Huber loss
    harness.py        the run harness (PureJaxRL-style): an agent's init + update scanned in jitted chunks, the
                      runner state checkpointed after each and resumed bit for bit, the environment batch sharded
                      over the devices' data axis, metrics.jsonl, results.json, a learning curve, progress
    host.py           the host-side loop for gymnasium environments (ppo_gymnasium, dqn_gymnasium): the harness's
                      claim, chunks, divergence check, checkpoints and resume, with per-chunk seeded env resets
    testing.py        kill-and-resume checks for experiments on the harness (SIGKILL right after a checkpoint)
    experiments/      reference runs registered with the experiment registry (ppo_cartpole, ppo_gymnasium,
                      dqn_gymnasium)
    bench/            benchmarks registered with the CLI (ppo-throughput)
"""
