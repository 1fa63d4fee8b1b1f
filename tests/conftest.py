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
# LLVM at -O0 for the CPU executables: the suite's models are tiny, so most of a cold run is XLA compiling them,
# and -O0 codegen compiles a train step about twice as fast while the tiny programs run about as fast (measured cold,
# seconds: tests/test_readme.py 82 -> 71, test_oreo_arith.py 86 -> 59, the PPO and DQN gymnasium tests 70 -> 67 CPU
# s; the runtime-heavier new_objective notebook 71 -> 73, unchanged within noise). The subprocess tests that
# compare runs bit for bit already pass it to every run they compare (rl.testing's fast_compile, test_sharding,
# test_distributed, test_local); here every test process and the children that inherit XLA_FLAGS get it. A level
# set in XLA_FLAGS beforehand wins.
LEVEL = "--xla_backend_optimization_level"
for flag in (FLAG, f"{LEVEL}=0"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

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


def pytest_collection_modifyitems(config, items):
    """The tests marked `slow` first, each group in collection order. pytest-xdist's work stealing hands the two
    workers halves of this list and lets an idle worker take tests from the end of the other's queue, so with the
    slow tests at the front the last tests to run are short ones and neither worker waits minutes for the other
    (collected alphabetically, the README walkthroughs and the notebooks came last)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
