"""What the dpo_files tests share: the sample files, and a tiny random Llama saved by transformers with the sample
tokenizer beside it (a stand-in for a user's Hugging Face checkpoint)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "tests" / "data"
TOKENIZER = DATA / "tokenizer"
VOCAB = 320  # the sample tokenizer has 301 ids (tests/data/make_tokenizer.py); a few spare rows as real models have


def read_rows(name: str) -> list[dict]:
    """The rows of tests/data/preferences/NAME."""
    with open(DATA / "preferences" / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_hf_model(root: Path, layers: int = 2) -> Path:
    """ROOT/hf_model: a random Llama of `layers` layers built and saved by transformers, with the sample tokenizer
    files."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    hf_dir = root / "hf_model"
    model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, hf_dir / name)
    return hf_dir


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """The runs of one test module compile identical programs: a persistent compilation cache (in a temporary
    directory, switched off again afterwards) lets the later runs (a resumed run, another config's) load the first
    one's executables instead of compiling them again. Results do not depend on it. A module uses it with
    `pytestmark = pytest.mark.usefixtures("compilation_cache")` after importing it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    saved = {name: getattr(jax.config, name) for name in settings}
    cc.reset_cache()
    for name, value in settings.items():
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
