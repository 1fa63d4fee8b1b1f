"""Tests for jaxalign.data.tokenize: HF tokenizer loading, chat templates, truncation, shared prefix, EOS, layout.

Expected token ids are computed independently with the raw `tokenizers.Tokenizer` and hand-written template text.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
import tokenizers.processors

from jaxalign.data import formats
from jaxalign.data.formats import DataFormatError
from jaxalign.data.tokenize import (TokenizeConfig, char_tokenizer, load_hf_tokenizer, render_chat,
                                    shared_prefix_length, tokenize_records)

HERE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "data"))
TOKENIZER = os.path.join(HERE, "tokenizer")
BOS, EOS, PAD = 1, 4, 0  # <s>, <|im_end|>, <pad> in tests/data/tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_hf_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def raw():
    return tokenizers.Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))


def ids(raw, text):
    return raw.encode(text, add_special_tokens=False).ids


def records(name, format="pairwise"):
    return formats.load_records(os.path.join(HERE, "preferences", f"{name}.jsonl"), format)[0]


def row(arrays, prefix, i):
    """(prompt ids, completion ids) of row i, read back through the masks; also checks the layout itself."""
    t, a, c = (arrays[f"{prefix}{k}"][i] for k in ("tokens", "attention_mask", "completion_mask"))
    n = int(a.sum())
    assert a[:n].all() and not a[n:].any(), "attention mask must be a prefix of ones"
    assert (t[n:] == PAD).all() and not c[n:].any()
    p = int(np.argmax(c)) if c.any() else n
    assert p >= 1 and c[p:n].all() and not c[:p].any(), "completion mask must be the tail of the real tokens"
    return t[:p].tolist(), t[p:n].tolist()


def test_loads_special_tokens_and_template_from_tokenizer_config(tok):
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos) == (EOS, PAD, BOS, True)
    assert tok.chat_template.startswith("{% for message in messages %}")
    assert len(tok.fingerprint) == 64


def test_missing_eos_and_unknown_token_are_clear_errors(tmp_path):
    shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="'eos_token' is missing"):
        load_hf_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    with pytest.raises(ValueError, match="eos_token '<eot>' is not in the vocabulary"):
        load_hf_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    loaded = load_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.pad_id == 2 and loaded.chat_template is None  # PAD falls back to EOS
    assert not loaded.add_bos  # no add_bos_token and a post-processor that adds nothing

    # Without add_bos_token, a post-processor that prepends BOS (Llama 3 style) decides.
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    raw.save(str(tmp_path / "tokenizer.json"))
    assert load_hf_tokenizer(str(tmp_path)).add_bos


def test_text_pairs_bos_prompt_then_completion_then_eos(tok, raw):
    """Plain text: [BOS] + prompt, then completion + EOS; chosen and rejected share the prompt ids."""
    recs = records("pairwise")
    data = tokenize_records("pairwise", recs, tok, TokenizeConfig(max_length=64))
    for i, r in enumerate(recs):
        prompt = [BOS] + ids(raw, r["prompt"])
        for side in ("chosen", "rejected"):
            assert row(data.arrays, f"{side}_", i) == (prompt, ids(raw, r[side]) + [EOS])
        assert data.lengths[i] == len(prompt) + max(len(ids(raw, r[s])) + 1 for s in ("chosen", "rejected"))
    assert data.report["rows_kept"] == 4 and data.lines.tolist() == [1, 2, 3, 4]


def test_chat_pairs_follow_the_template(tok, raw):
    """Chat: the prompt is the rendering with the generation prompt (no BOS: the template owns special tokens);
    the completion is the assistant turn the full rendering adds, ended by the template, no extra EOS."""
    expected_prompt = ("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
                       "<|im_end|>\n<|im_start|>assistant\n")
    recs = records("pairwise_chat")
    assert render_chat(tok, recs[0]["prompt"], add_generation_prompt=True) == expected_prompt
    data = tokenize_records("pairwise", recs, tok, TokenizeConfig(max_length=64))
    assert row(data.arrays, "chosen_", 0) == (ids(raw, expected_prompt), ids(raw, "4<|im_end|>\n"))
    assert row(data.arrays, "rejected_", 0) == (ids(raw, expected_prompt), ids(raw, "5<|im_end|>\n"))


def test_two_column_rows_split_at_the_shared_token_prefix(tok, raw):
    """Without a prompt the prompt is the longest shared token prefix; the chat row gives exactly the tokens of
    the same conversation written with an explicit prompt."""
    two = tokenize_records("pairwise", records("pairwise_two_column"), tok, TokenizeConfig(max_length=64))
    full_c = [BOS] + ids(raw, "Question: what is 2+2?\nAnswer: 4")
    full_r = [BOS] + ids(raw, "Question: what is 2+2?\nAnswer: 5")
    k = shared_prefix_length(full_c, full_r)
    assert 0 < k < len(full_c) and full_c[:k] == full_r[:k] and full_c[k] != full_r[k]
    assert row(two.arrays, "chosen_", 0) == (full_c[:k], full_c[k:] + [EOS])
    assert row(two.arrays, "rejected_", 0) == (full_r[:k], full_r[k:] + [EOS])
    explicit = tokenize_records("pairwise", records("pairwise_chat"), tok, TokenizeConfig(max_length=64))
    for key in two.arrays:
        np.testing.assert_array_equal(two.arrays[key][1], explicit.arrays[key][1], err_msg=key)


def test_identical_two_column_pair_fails_or_is_counted(tok):
    recs = [{"chosen": "same text", "rejected": "same text", "line": 7}, {"chosen": "ab", "rejected": "ac", "line": 8}]
    with pytest.raises(DataFormatError, match=r"pairs.jsonl line 7: field 'rejected' tokenizes exactly like"):
        tokenize_records("pairwise", recs, tok, TokenizeConfig(max_length=16), source="pairs.jsonl")
    data = tokenize_records("pairwise", recs, tok, TokenizeConfig(max_length=16), on_error="skip")
    assert data.report["skipped_by_reason"] == {"rejected: identical to chosen": 1} and data.lines.tolist() == [8]


def test_truncation_policies(tok, raw):
    """keep_end keeps the prompt's end, keep_start its start; a completion keeps its start (and loses its EOS);
    drop skips and counts; error stops with the line."""
    r = {"prompt": "Question: what is the capital of France?\nAnswer:", "chosen": " Paris, of course it is",
         "rejected": " Lyon", "line": 3}
    prompt, chosen = [BOS] + ids(raw, r["prompt"]), ids(raw, r["chosen"]) + [EOS]
    cfg = TokenizeConfig(max_length=12, max_prompt_length=5)
    data = tokenize_records("pairwise", [r], tok, cfg)
    assert row(data.arrays, "chosen_", 0) == (prompt[-5:], chosen[:7])
    assert row(data.arrays, "rejected_", 0) == (prompt[-5:], ids(raw, " Lyon") + [EOS])
    assert data.report["prompts_truncated"] == 2 and data.report["completions_truncated"] == 1
    data = tokenize_records("pairwise", [r], tok, TokenizeConfig(max_length=12, max_prompt_length=5,
                                                                 prompt_truncation="keep_start"))
    assert row(data.arrays, "chosen_", 0)[0] == prompt[:5]
    long_prompt = TokenizeConfig(max_length=len(prompt) + 2, on_overflow="drop")
    ok = dict(r, prompt="Hi:", line=4)
    data = tokenize_records("pairwise", [r, ok], tok, long_prompt)
    assert data.report["skipped_by_reason"] == {"too long": 1} and data.lines.tolist() == [4]
    with pytest.raises(DataFormatError, match="line 3: field 'chosen' needs"):
        tokenize_records("pairwise", [r], tok, TokenizeConfig(max_length=len(prompt) + 2, on_overflow="error"))


def test_eos_policies_never_double(tok, raw):
    r = {"prompt": "Q:", "chosen": " yes<|im_end|>", "rejected": " no", "line": 1}
    auto = tokenize_records("pairwise", [r], tok, TokenizeConfig(max_length=16))
    assert row(auto.arrays, "chosen_", 0)[1] == ids(raw, " yes") + [EOS]
    assert row(auto.arrays, "rejected_", 0)[1] == ids(raw, " no") + [EOS]
    never = tokenize_records("pairwise", [r], tok, TokenizeConfig(max_length=16, eos="never"))
    assert row(never.arrays, "rejected_", 0)[1] == ids(raw, " no")
    chat = records("pairwise_chat")[:1]
    always = tokenize_records("pairwise", chat, tok, TokenizeConfig(max_length=64, eos="always"))
    assert row(always.arrays, "chosen_", 0)[1] == ids(raw, "4<|im_end|>\n") + [EOS]


def test_ranked_lists_pad_to_the_longest_list(tok, raw):
    data = tokenize_records("ranked", records("ranked", "ranked"), tok, TokenizeConfig(max_length=48))
    assert data.arrays["list_tokens"].shape == (3, 4, 48)
    np.testing.assert_array_equal(data.arrays["list_valid"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_allclose(data.arrays["list_scores"], [[1, 0, 0.8, 0], [1, 0, 0, 0], [1, 0, 1, 0]])
    prompt = [BOS] + ids(raw, "Question: what is 2+2?\nAnswer:")
    arrays = {k[len("list_"):]: v[0] for k, v in data.arrays.items() if k.endswith(("tokens", "mask"))}
    assert row(arrays, "", 2) == (prompt, ids(raw, " four") + [EOS])
    assert not data.arrays["list_attention_mask"][1, 2:].any()


def test_stepwise_prompt_holds_the_earlier_steps(tok, raw):
    """The prompt is prompt + each earlier step + separator; the compared steps get no EOS under auto."""
    data = tokenize_records("stepwise", records("stepwise", "stepwise"), tok, TokenizeConfig(max_length=48))
    assert row(data.arrays, "chosen_", 1) == ([BOS] + ids(raw, "Compute 7+5+9.\n7+5=12\n"), ids(raw, "12+9=21"))
    assert row(data.arrays, "rejected_", 1)[1] == ids(raw, "12+9=11")


def test_trajectory_marks_each_step_end(tok, raw):
    """step_end_mask is 1 on the last token of each step (separator included, EOS closing the last step)."""
    data = tokenize_records("trajectory", records("trajectory", "trajectory"), tok, TokenizeConfig(max_length=48))
    steps = ["3+4=7\n", "7+8=15\n", "So the answer is 15."]
    _, completion = row(data.arrays, "", 2)
    expected = ids(raw, steps[0]) + ids(raw, steps[1]) + ids(raw, steps[2]) + [EOS]
    assert completion == expected
    start = len([BOS] + ids(raw, "Compute 3+4+8.\n"))
    ends = np.cumsum([len(ids(raw, s)) for s in steps]) - 1
    ends[-1] += 1  # the EOS
    assert np.nonzero(data.arrays["step_end_mask"][2])[0].tolist() == (start + ends).tolist()
    np.testing.assert_allclose(data.arrays["reward"], [1.0, 0.0, 1.0])


def test_unpaired_labels(tok):
    data = tokenize_records("unpaired", records("unpaired", "unpaired"), tok, TokenizeConfig(max_length=48))
    assert data.arrays["label"].tolist() == [1, 0, 1] and data.arrays["tokens"].shape == (3, 48)


def test_char_tokenizer_keeps_working_and_refuses_what_it_cannot_do():
    """The built-in character tokenizer tokenizes ARITH-style rows; chat rows and unknown characters are row
    errors naming the line."""
    tok = char_tokenizer()
    recs = [{"prompt": "1+2+3+4=", "chosen": "1+2=3;3+3=6;6+4=10", "rejected": "1+2=3", "line": 1}]
    data = tokenize_records("pairwise", recs, tok, TokenizeConfig(max_length=32))
    assert row(data.arrays, "chosen_", 0) == (tok.encode("1+2+3+4="), tok.encode("1+2=3;3+3=6;6+4=10") + [1])
    chat = [{"prompt": [{"role": "user", "content": "1+2="}], "completion": [{"role": "assistant", "content": "3"}],
             "label": True, "line": 2}]
    with pytest.raises(DataFormatError, match="line 2: field 'prompt' is a message list but the tokenizer has no"):
        tokenize_records("unpaired", chat, tok, TokenizeConfig(max_length=32))
    bad = [dict(recs[0], chosen="three", line=5)]
    with pytest.raises(DataFormatError, match="line 5: field 'chosen' cannot be tokenized"):
        tokenize_records("pairwise", bad, tok, TokenizeConfig(max_length=32))


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        TokenizeConfig(max_length=1)
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        TokenizeConfig(max_length=8, on_overflow="wrap")
