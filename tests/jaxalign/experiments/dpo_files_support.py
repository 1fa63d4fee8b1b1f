"""What the dpo_files tests share: the sample files, and a tiny random Llama saved by transformers with the sample
tokenizer beside it (a stand-in for a user's Hugging Face checkpoint)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def tiny_hf_model(root: Path) -> Path:
    """ROOT/hf_model: a 2-layer random Llama built and saved by transformers, with the sample tokenizer files."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    hf_dir = root / "hf_model"
    model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, hf_dir / name)
    return hf_dir
