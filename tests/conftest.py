"""Settings every test process needs before JAX starts its CPU backend.

XLA's CPU backend runs batched LAPACK custom calls (a vmapped QR, e.g. the orthogonal initialisers of PPO vmapped
over seeds) on its intra-op Eigen thread pool, and each call waits there for sub-tasks queued on the same pool. On
a 2-core machine running two pytest workers the pool has two threads, so two such calls at once can wait on each
other forever (seen once in this suite: tests/rl/test_ppo.py hung in `BlockUntilReady` with both pool threads in
`ParallelBatchMap`). Single-threaded Eigen runs those sub-tasks inline. The flag is read when the backend starts,
so setting it here (before any test computes) is in time; child processes inherit it unless a test sets its own
XLA_FLAGS. Results are unchanged up to float summation order, which no test depends on.
"""
import os

FLAG = "--xla_cpu_multi_thread_eigen=false"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()
