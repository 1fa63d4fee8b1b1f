"""jaxalign: preference optimisation of sequence models in JAX.

Layout (each folder one idea): models/ (the decoder LM), logprobs.py (masked per-token log-probs), losses/
(objectives as pure functions + registry), sharding.py (mesh + logical-axis rules), sampling.py (KV-cached
sampler), tasks/ (built-in synthetic tasks and their oracles), data/ (deterministic resumable batching), train/
(state, optimizer, steps, loop, checkpoints), experiments/ (registered pipelines), bench/ (benchmarks).
"""
__version__ = "0.1.0"
