"""Flax decoder language models, and their conversion to and from Hugging Face checkpoints (`hf`)."""
from jaxalign.models.hf import from_pretrained, load_native, save_native, save_pretrained
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params, init_cache, init_params

__all__ = ["DecoderLM", "ModelConfig", "count_params", "from_pretrained", "init_cache", "init_params", "load_native",
           "save_native", "save_pretrained"]
