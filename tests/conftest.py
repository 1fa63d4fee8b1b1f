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

# A persistent XLA compilation cache shared by the test processes (both pytest workers and the children tests
# start): many tests compile the same small programs (the same tiny model's step, the same sampler), and a cache
# hit skips XLA's compile. Keys hash the whole HLO and the compile options, so a changed program never hits a stale
# entry. Per user, under the system's temporary directory, at most 1 GiB (least recently used entries evicted);
# tests that manage a cache of their own pass JAX_COMPILATION_CACHE_DIR to their children explicitly.
import tempfile  # noqa: E402

import jax  # noqa: E402

CACHE_SETTINGS = {
    "jax_compilation_cache_dir": os.path.join(tempfile.gettempdir(), f"jaxalign-tests-xla-cache-{os.getuid()}"),
    "jax_persistent_cache_min_compile_time_secs": 0.5,
    "jax_compilation_cache_max_size": 2**30,
}
for name, value in CACHE_SETTINGS.items():
    os.environ.setdefault(name.upper(), str(value))
    jax.config.update(name, type(value)(os.environ[name.upper()]))
