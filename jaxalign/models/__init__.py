"""Flax decoder language models."""
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params, init_cache, init_params

__all__ = ["DecoderLM", "ModelConfig", "count_params", "init_cache", "init_params"]
