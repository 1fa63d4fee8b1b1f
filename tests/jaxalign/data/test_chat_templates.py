"""Chat rows against transformers' own `apply_chat_template`, token for token, with four real families' templates.

Each family's tokenizer directory is saved by transformers (`save_pretrained`): the small byte-level BPE of
tests/data/tokenizer plus that family's special tokens, and the family's real chat template (Llama 3.1, Qwen2.5 and
Gemma from the copies TRL installs; Mistral Instruct from tests/data/chat_templates). The reference is what a
transformers user gets: `AutoTokenizer.from_pretrained(directory).apply_chat_template(...)`.
"""
from __future__ import annotations

import importlib.resources
import os

import numpy as np
import pytest
import tokenizers
import transformers

from jaxalign.data.formats import DataFormatError
from jaxalign.data.tokenize import TokenizeConfig, load_hf_tokenizer, render_chat, tokenize_records

HERE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data"))
TRL_TEMPLATES = importlib.resources.files("trl") / "chat_templates"

# family -> (template source, bos, eos, pad, other special tokens)
FAMILIES = {
    "llama3.1": ("llama3_1.jinja", "<|begin_of_text|>", "<|eot_id|>", None,
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    "qwen2.5": ("qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "gemma": ("gemma.jinja", "<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": ("mistral_instruct.jinja", "<s>", "</s>", None, []),
    # TRL's variants of the same templates with {% generation %} blocks around the assistant's output.
    "qwen2.5-generation": ("qwen2_5_training.jinja", None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "gemma-generation": ("gemma_training.jinja", "<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"]),
}

SYSTEM = {"role": "system", "content": "You answer briefly."}
USER = {"role": "user", "content": "What is 2+2? Say it with ünïcode, \"quotes\" and\nnewlines."}
CONVERSATIONS = {  # name -> (prompt messages, chosen turn, rejected turn)
    "single turn": ([USER], "4", "5, I think."),
    "with system": ([SYSTEM, USER], "Four.", "Five"),
    "multi turn": ([USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
                   "6", " seven "),
}


def _template(source: str) -> str:
    if source == "mistral_instruct.jinja":
        with open(os.path.join(HERE, "chat_templates", source), encoding="utf-8") as f:
            return f.read()
    return (TRL_TEMPLATES / source).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> a tokenizer directory written by transformers' save_pretrained."""
    dirs = {}
    for family, (source, bos, eos, pad, extra) in FAMILIES.items():
        raw = tokenizers.Tokenizer.from_file(os.path.join(HERE, "tokenizer", "tokenizer.json"))
        raw.add_special_tokens([t for t in (bos, eos, pad, *extra) if t is not None])
        specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v is not None}
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=_template(source), **specials)
        directory = str(tmp_path_factory.mktemp(family.replace(".", "_")))
        hf.save_pretrained(directory)
        dirs[family] = directory
    return dirs


def _reference(directory: str, messages: list[dict], add_generation_prompt: bool):
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    generation = "generation %}" in ref.chat_template
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  add_generation_prompt=add_generation_prompt,
                                  return_assistant_tokens_mask=generation)
    return list(out["input_ids"]), (list(out["assistant_masks"]) if generation else None), ref


def _sequence(arrays, side: str, i: int):
    t, a, c = (arrays[f"{side}_{k}"][i] for k in ("tokens", "attention_mask", "completion_mask"))
    n = int(a.sum())
    return t[:n].tolist(), c[:n].tolist()


# Gemma's template refuses a system turn (test_template_refusal_is_a_row_error).
@pytest.mark.parametrize("family,conversation", [(f, c) for f in ("llama3.1", "qwen2.5", "gemma", "mistral")
                                                 for c in CONVERSATIONS if (f, c) != ("gemma", "with system")])
def test_pairs_are_transformers_tokens_for_token(family_dirs, family, conversation):
    """Prompt = apply_chat_template(prompt, add_generation_prompt=True); prompt + completion = the full
    conversation's tokens; the completion mask is 1 exactly after the prompt."""
    prompt, chosen, rejected = CONVERSATIONS[conversation]
    directory = family_dirs[family]
    tok = load_hf_tokenizer(directory)
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
              "rejected": [{"role": "assistant", "content": rejected}], "line": 1}
    data = tokenize_records("pairwise", [record], tok, TokenizeConfig(max_length=512))

    expected_prompt, _, ref = _reference(directory, prompt, add_generation_prompt=True)
    assert render_chat(tok, prompt, add_generation_prompt=True) == ref.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    for side in ("chosen", "rejected"):
        full, _, _ = _reference(directory, prompt + record[side], add_generation_prompt=False)
        tokens, mask = _sequence(data.arrays, side, 0)
        assert tokens == full, f"{family} {conversation} {side}"
        assert tokens[: len(expected_prompt)] == expected_prompt
        assert mask == [0] * len(expected_prompt) + [1] * (len(full) - len(expected_prompt))


@pytest.mark.parametrize("family", ["qwen2.5-generation", "gemma-generation"])
def test_generation_blocks_set_the_completion_mask(family_dirs, family):
    """With {% generation %} blocks the completion mask is transformers' assistant-token mask after the prompt. A
    completion of several turns (an agent's reply, the user's interjection, the reply's end) trains on the
    assistant's turns only; the user's turn in between is context."""
    directory = family_dirs[family]
    tok = load_hf_tokenizer(directory)
    prompt = [USER]
    chosen = [{"role": "assistant", "content": "Let me add."}, {"role": "user", "content": "Go on."},
              {"role": "assistant", "content": "4"}]
    rejected = [{"role": "assistant", "content": "5"}]
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "line": 1}
    data = tokenize_records("pairwise", [record], tok, TokenizeConfig(max_length=512))
    expected_prompt, _, _ = _reference(directory, prompt, add_generation_prompt=True)
    for side in ("chosen", "rejected"):
        full, assistant, _ = _reference(directory, prompt + record[side], add_generation_prompt=False)
        tokens, mask = _sequence(data.arrays, side, 0)
        assert tokens == full
        assert mask == [0] * len(expected_prompt) + assistant[len(expected_prompt):]
    tokens, mask = _sequence(data.arrays, "chosen", 0)
    completion = list(zip(tokens, mask))[len(expected_prompt):]
    assert completion[0][1] == 1 and completion[-1][1] == 1, "both replies are trained on"
    user_turn = tok.encode("Go on.")
    starts = [i for i in range(len(completion)) if [t for t, _ in completion[i:i + len(user_turn)]] == user_turn]
    assert len(starts) == 1 and not any(m for _, m in completion[starts[0]:starts[0] + len(user_turn)])


def test_llama_template_dates_and_unpaired_rows(family_dirs):
    """Llama 3.1's template calls strftime_now (the rendering that used to fail); unpaired chat rows are the same
    tokens as the full conversation too."""
    directory = family_dirs["llama3.1"]
    tok = load_hf_tokenizer(directory)
    prompt = [SYSTEM, USER]
    text = render_chat(tok, prompt, add_generation_prompt=True)
    assert "Cutting Knowledge Date: December 2023" in text and "Today Date: " in text
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Four."}], "label": True, "line": 1}
    data = tokenize_records("unpaired", [record], tok, TokenizeConfig(max_length=512))
    full, _, _ = _reference(directory, prompt + record["completion"], add_generation_prompt=False)
    n = int(data.arrays["attention_mask"][0].sum())
    assert data.arrays["tokens"][0, :n].tolist() == full


def test_template_refusal_is_a_row_error(family_dirs):
    """Gemma's template raises on a system turn: that row fails naming the line and the template's message, or is
    skipped and counted under --on-error skip."""
    tok = load_hf_tokenizer(family_dirs["gemma"])
    bad = {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}], "line": 3}
    good = dict(bad, prompt=[USER], line=4)
    with pytest.raises(DataFormatError, match=r"prefs.jsonl line 3: .*System role not supported"):
        tokenize_records("pairwise", [bad, good], tok, TokenizeConfig(max_length=512), source="prefs.jsonl")
    data = tokenize_records("pairwise", [bad, good], tok, TokenizeConfig(max_length=512), on_error="skip")
    assert data.report["skipped_by_reason"] == {"chat template error": 1} and data.lines.tolist() == [4]
    np.testing.assert_array_equal(data.arrays["chosen_tokens"][0][:3], data.arrays["rejected_tokens"][0][:3])
