"""From validated preference records to padded token arrays in the layout the trainers read.

Tokenizers: a Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json on disk (`load_hf_tokenizer`), with
its special tokens and chat template from the tokenizer_config.json beside it, or the built-in character tokenizer
(`char_tokenizer`) for the built-in tasks. Both expose the same small interface (`encode`, `decode`, `eos_id`,
`pad_id`, `bos_id`, `add_bos`, `chat_template`, `fingerprint`, `vocab_size`).

Layout (the keys arith_dpo's pairs use, so packing and every trainer read them unchanged): each sequence is the
prompt's tokens followed by the completion's tokens, right-padded with `pad_id` to `max_length`;
`attention_mask` is 1 on real tokens, `completion_mask` is 1 on the completion only. The first token is always a
prompt token, because a causal LM gives no log-probability to position 0.

=============  =====================================================================================================
pairwise,      chosen_tokens, chosen_attention_mask, chosen_completion_mask, rejected_* [N, L]
stepwise       (stepwise: the prompt is the prompt plus the earlier steps; the completion is the step)
ranked         list_tokens, list_attention_mask, list_completion_mask [N, K, L], list_scores [N, K] float32,
               list_valid [N, K] (0 for the padding lists of rows with fewer than K completions)
unpaired       tokens, attention_mask, completion_mask [N, L], label [N] (1 desirable, 0 undesirable)
trajectory     tokens, attention_mask, completion_mask, step_end_mask (1 on each step's last token) [N, L],
               reward [N] float32
=============  =====================================================================================================

Chat rows are rendered and tokenized by transformers' `apply_chat_template` on the same tokenizer files (the
maintained implementation; tests/jaxalign/data/test_chat_templates.py checks Llama 3.1, Qwen2.5, Gemma and Mistral
templates against it token for token). The prompt is the conversation with `add_generation_prompt=True`; the
completion is what the full conversation's tokens add after the prompt's (TRL's convention), so the template's own
end-of-turn tokens are trained on and the prompt tokens are identical for chosen and rejected. A template whose
prompt tokens are not a prefix of the full conversation's is an error for that row. When the template marks the
assistant's output with `{% generation %}` blocks, `completion_mask` is 1 only on the completion's tokens inside
them (transformers' assistant-token mask), so text the template adds around the reply is context, not target.

EOS (`eos`): "auto" appends the EOS id to plain-text completions and trajectories (a chat template ends the turn
itself, and a step is not the end of a response), "always" and "never" do what they say; an EOS is never doubled.

Truncation: a prompt longer than `max_prompt_length` (and than `max_length - 1`) keeps its end ("keep_end", the
default: the question is usually last) or its start; a completion that still does not fit keeps its start (and
loses its EOS, correctly: it did not end there); the report counts truncated prompts and completions.
`on_overflow="drop"` skips such rows instead (counted as "too long"), `on_overflow="error"` stops with the row's
line. Other rows that cannot be tokenized (no chat template, identical pair, empty prompt) follow `on_error`.

Two-column pairwise rows (no prompt) are tokenized whole; the prompt is the longest shared token prefix of chosen
and rejected (computed on tokens, so it never ends inside a token), the completions are the rest.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from jaxalign.data import formats
from jaxalign.data.formats import DataFormatError, RowError

PROMPT_TRUNCATION = ("keep_end", "keep_start")
ON_OVERFLOW = ("truncate", "drop", "error")
EOS_POLICIES = ("auto", "always", "never")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """What the data pipeline needs from a tokenizer; `encode` never adds special tokens by itself.

    `add_bos`: prepend `bos_id` to plain-text prompts (chat templates write their own BOS text).
    `chat_backend`: a zero-argument function returning the transformers tokenizer of the same files, which renders
    and tokenizes chat rows (loaded on first use, once per process).
    `fingerprint`: sha256 of everything that decides token ids, for cache keys and checkpoint metadata.
    """

    encode_fn: Any
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    chat_backend: Any = None
    fingerprint: str = ""
    decode_fn: Any = None
    vocab_size: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.encode_fn(text))

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens included (as transformers' `decode` does by default)."""
        if self.decode_fn is None:
            raise ValueError("this tokenizer cannot decode")
        return self.decode_fn([int(i) for i in ids])


def char_tokenizer() -> TextTokenizer:
    """The built-in CharTokenizer (PAD 0, EOS 1, "0123456789+=;") behind the pipeline's interface."""
    from jaxalign.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer()
    return TextTokenizer(encode_fn=tok.encode, eos_id=tok.EOS_ID, pad_id=tok.PAD_ID,
                         fingerprint=hashlib.sha256(f"char:{tok.CHARS}".encode()).hexdigest(),
                         decode_fn=tok.decode, vocab_size=tok.vocab_size)


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config: dict, directory: str) -> str | None:
    """The default chat template: tokenizer_config's `chat_template` (a string, or a list of named templates), else
    a chat_template.jinja file beside it (newer Hugging Face exports)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        with open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    return template


def load_hf_tokenizer(path: str) -> TextTokenizer:
    """A tokenizer.json (or a directory holding one) plus the tokenizer_config.json beside it, if any.

    EOS is required (from tokenizer_config's `eos_token`): without it no completion could be terminated. PAD
    defaults to EOS when the config names none; padded positions are masked, so their id never matters. Special
    tokens are never added by `encode`: BOS is prepended to plain-text prompts when `add_bos_token` (or, without
    it, the tokenizer's post-processor) says so, and chat templates write their own.
    """
    import tokenizers  # Only users of their own tokenizer pay for the import.

    tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
    directory = os.path.dirname(os.path.abspath(tokenizer_file))
    config_file = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    tok = tokenizers.Tokenizer.from_file(tokenizer_file)

    def token_id(key: str, required: bool) -> int | None:
        name = _token_string(config.get(key))
        if name is None:
            if required:
                raise ValueError(f"{config_file}: '{key}' is missing; the tokenizer needs an end-of-sequence token")
            return None
        found = tok.token_to_id(name)
        if found is None:
            raise ValueError(f"{config_file}: {key} {name!r} is not in the vocabulary of {tokenizer_file}")
        return int(found)

    eos_id = token_id("eos_token", required=True)
    pad_id = token_id("pad_token", required=False)
    bos_id = token_id("bos_token", required=False)
    # tokenizer_config's add_bos_token when it says; otherwise whatever the tokenizer's own post-processor does
    # (Llama 3 style files add BOS there, and say nothing in the config).
    add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else \
        bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    if add_bos and bos_id is None:
        raise ValueError(f"{config_file}: add_bos_token is true but bos_token is missing")
    template = _chat_template(config, directory)
    template_vars = tuple((k, _token_string(config.get(k)) or "") for k in
                          ("bos_token", "eos_token", "pad_token", "unk_token"))
    digest = hashlib.sha256()
    with open(tokenizer_file, "rb") as f:
        digest.update(f.read())
    digest.update(json.dumps([eos_id, pad_id, bos_id, add_bos, template, template_vars]).encode())
    if template is not None:  # Chat rows are tokenized by transformers since this marker; older caches re-tokenize.
        digest.update(b"chat: transformers apply_chat_template, token-level prefix")
    config_path = config_file if os.path.isfile(config_file) else None
    return TextTokenizer(
        encode_fn=lambda text: tok.encode(text, add_special_tokens=False).ids, eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id, bos_id=bos_id, add_bos=add_bos, chat_template=template,
        chat_backend=functools.partial(_transformers_tokenizer, os.path.abspath(tokenizer_file), config_path,
                                       template),
        fingerprint=digest.hexdigest(), decode_fn=lambda ids: tok.decode(ids, skip_special_tokens=False),
        vocab_size=tok.get_vocab_size(with_added_tokens=True))


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@functools.lru_cache(maxsize=8)
def _transformers_tokenizer(tokenizer_file: str, config_file: str | None, template: str | None):
    """The same files loaded by transformers, whose `apply_chat_template` renders chat rows: the maintained
    implementation (sandboxed Jinja with the Hugging Face helpers: strftime_now, raise_exception, tojson's
    arguments, `{% generation %}` blocks), so a conversation gets exactly the tokens transformers gives it."""
    from transformers import PreTrainedTokenizerFast  # Only chat rows pay for the import.

    config = {}
    if config_file is not None:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    special = {k: _token_string(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, chat_template=template,
                                   **{k: v for k, v in special.items() if v is not None})


def _template_error(field: str, error: Exception) -> RowError:
    return RowError(field, "chat template error", f"the chat template refused field '{field}': {error}")


def _require_template(tok: TextTokenizer, field: str) -> None:
    if tok.chat_template is None or tok.chat_backend is None:
        raise RowError(field, "no chat template",
                       f"field '{field}' is a message list but the tokenizer has no chat_template "
                       "(tokenizer_config.json or chat_template.jinja)")


def render_chat(tok: TextTokenizer, messages: list[dict], add_generation_prompt: bool, field: str = "prompt") -> str:
    """The text of `messages` under the tokenizer's chat template; RowError if there is none or it refuses."""
    _require_template(tok, field)
    import jinja2

    try:
        return tok.chat_backend().apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
    except (jinja2.exceptions.TemplateError, ValueError, TypeError) as e:
        raise _template_error(field, e) from None


def chat_ids(tok: TextTokenizer, messages: list[dict], add_generation_prompt: bool,
             field: str = "prompt") -> tuple[list[int], list[int] | None]:
    """Token ids of `messages` under the chat template, as transformers' `apply_chat_template(tokenize=True)` gives
    them, and its assistant-token mask (1 inside the template's `{% generation %}` blocks) when the template has
    such blocks, else None."""
    _require_template(tok, field)
    import jinja2

    with_mask = bool(_GENERATION_TAG.search(tok.chat_template))
    try:
        out = tok.chat_backend().apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     add_generation_prompt=add_generation_prompt,
                                                     return_assistant_tokens_mask=with_mask)
    except (jinja2.exceptions.TemplateError, ValueError, TypeError) as e:
        raise _template_error(field, e) from None
    return list(out["input_ids"]), (list(out["assistant_masks"]) if with_mask else None)


# ----------------------------------------------------------------------------------------------------------------
# Sequences


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Lengths and policies of tokenization (see the module docstring)."""

    max_length: int
    max_prompt_length: int | None = None
    prompt_truncation: str = "keep_end"
    on_overflow: str = "truncate"
    eos: str = "auto"
    step_separator: str = "\n"

    def __post_init__(self):
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"TokenizeConfig.max_length must be an int >= 2, got {self.max_length!r}")
        if self.max_prompt_length is not None and (not isinstance(self.max_prompt_length, int)
                                                   or self.max_prompt_length < 1):
            raise ValueError(f"TokenizeConfig.max_prompt_length must be None or an int >= 1, "
                             f"got {self.max_prompt_length!r}")
        for name, allowed in (("prompt_truncation", PROMPT_TRUNCATION), ("on_overflow", ON_OVERFLOW),
                              ("eos", EOS_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TokenizeConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One sequence: prompt ids, completion ids, (trajectories) the completion-relative step ends, and (chat
    templates with generation blocks) which completion tokens are trained on; None means all of them."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    step_ends: tuple[int, ...] = ()
    trained: tuple[int, ...] | None = None


def _encode(tok: TextTokenizer, text: str, field: str) -> list[int]:
    try:
        return tok.encode(text)
    except ValueError as e:  # The character tokenizer refuses characters outside its vocabulary.
        raise RowError(field, "untokenizable", f"field '{field}' cannot be tokenized: {e}") from None


def _is_chat(value: Any) -> bool:
    return isinstance(value, list)


def _with_eos(tok: TextTokenizer, ids: list[int], default: bool, cfg: TokenizeConfig) -> list[int]:
    add = cfg.eos == "always" or (cfg.eos == "auto" and default)
    return ids + [tok.eos_id] if add and (not ids or ids[-1] != tok.eos_id) else ids


def prompt_text(tok: TextTokenizer, prompt: Any) -> str:
    """The prompt as text: itself, or its chat rendering ending in the assistant's generation prompt."""
    return render_chat(tok, prompt, add_generation_prompt=True) if _is_chat(prompt) else prompt


def prompt_ids(tok: TextTokenizer, prompt: Any) -> list[int]:
    """A prompt's ids: [BOS] + its text, or the chat template's tokens up to the assistant's generation prompt."""
    if _is_chat(prompt):
        return chat_ids(tok, prompt, add_generation_prompt=True)[0]
    return ([tok.bos_id] if tok.add_bos else []) + _encode(tok, prompt, "prompt")


def completion_piece(tok: TextTokenizer, prompt: Any, completion: Any, field: str, cfg: TokenizeConfig) -> Piece:
    """The prompt's ids and a completion's: plain text (+ EOS under "auto"), or the tokens the chat template adds for
    the assistant's turn (with its generation mask, if the template has one)."""
    p = prompt_ids(tok, prompt)
    if not _is_chat(completion):
        return Piece(tuple(p), tuple(_with_eos(tok, _encode(tok, completion, field), True, cfg)))
    full, mask = chat_ids(tok, list(prompt) + list(completion), add_generation_prompt=False, field=field)
    if full[: len(p)] != p:
        raise RowError(field, "chat template: prompt not a prefix",
                       f"the chat template's tokens of the prompt are not a prefix of the conversation with "
                       f"field '{field}', so the completion cannot be separated")
    ids = _with_eos(tok, full[len(p):], False, cfg)
    trained = None if mask is None else tuple(mask[len(p):]) + (1,) * (len(ids) - (len(full) - len(p)))
    return Piece(tuple(p), tuple(ids), trained=trained)


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    mismatch = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(mismatch[0]) if len(mismatch) else n


def split_two_column(tok: TextTokenizer, chosen: Any, rejected: Any, cfg: TokenizeConfig) -> tuple[Piece, Piece]:
    """Chosen and rejected without a prompt: the prompt is their shared token prefix, the rest the completions."""
    def whole(value, field):
        if _is_chat(value):
            return chat_ids(tok, value, add_generation_prompt=False, field=field)[0], False
        return prompt_ids(tok, value), True

    (a, text_a), (b, text_b) = whole(chosen, "chosen"), whole(rejected, "rejected")
    if a == b:
        raise RowError("rejected", "rejected: identical to chosen",
                       "field 'rejected' tokenizes exactly like 'chosen'; the pair carries no preference")
    k = shared_prefix_length(a, b)
    if k == 0:
        raise RowError("chosen", "no shared prefix",
                       "fields 'chosen' and 'rejected' share no leading token, so there is no prompt to extract; "
                       "add a 'prompt' field")
    return (Piece(tuple(a[:k]), tuple(_with_eos(tok, a[k:], text_a, cfg))),
            Piece(tuple(b[:k]), tuple(_with_eos(tok, b[k:], text_b, cfg))))


def fit(piece: Piece, cfg: TokenizeConfig, field: str, counts: collections.Counter) -> Piece:
    """`piece` cut to the length limits (or RowError "too long" under on_overflow drop/error)."""
    prompt, completion = piece.prompt, piece.completion
    limit = min(cfg.max_prompt_length or cfg.max_length, cfg.max_length - 1)
    if len(prompt) > limit:
        if cfg.on_overflow != "truncate":
            raise RowError("prompt", "too long", f"the prompt has {len(prompt)} tokens, more than the {limit} "
                                                 "allowed (max_prompt_length / max_length - 1)")
        prompt = prompt[-limit:] if cfg.prompt_truncation == "keep_end" else prompt[:limit]
        counts["prompts_truncated"] += 1
    room = cfg.max_length - len(prompt)
    if len(completion) > room:
        if cfg.on_overflow != "truncate":
            raise RowError(field, "too long", f"field '{field}' needs {len(prompt) + len(completion)} tokens with "
                                              f"its prompt, more than max_length {cfg.max_length}")
        completion = completion[:room]
        counts["completions_truncated"] += 1
    if not prompt:
        raise RowError("prompt", "prompt: empty", "the prompt is empty after tokenization; a causal LM needs at "
                                                  "least one token before the completion")
    trained = None if piece.trained is None else piece.trained[: len(completion)]
    if not completion or (trained is not None and not any(trained)):
        raise RowError(field, f"{field}: empty", f"field '{field}' is empty after tokenization"
                       + ("" if not completion else " (no token of it is inside the template's generation blocks)"))
    return Piece(prompt, completion, tuple(e for e in piece.step_ends if e < len(completion)), trained)


def _layout(pieces: Sequence[Piece], tok: TextTokenizer, length: int) -> dict[str, np.ndarray]:
    """tokens / attention_mask / completion_mask / step_end_mask [len(pieces), length] for fitted pieces."""
    n = len(pieces)
    tokens = np.full((n, length), tok.pad_id, np.int32)
    attention, completion, step_end = (np.zeros((n, length), np.int32) for _ in range(3))
    for i, p in enumerate(pieces):
        ids = p.prompt + p.completion
        tokens[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        completion[i, len(p.prompt) : len(ids)] = 1 if p.trained is None else p.trained
        for e in p.step_ends:
            step_end[i, len(p.prompt) + e] = 1
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion, "step_end_mask": step_end}


# ----------------------------------------------------------------------------------------------------------------
# Per format: a record -> the fitted pieces (and scalars) of one row


def _pair_pieces(tok, record, cfg):
    if "prompt" not in record:
        return split_two_column(tok, record["chosen"], record["rejected"], cfg)
    return tuple(completion_piece(tok, record["prompt"], record[side], side, cfg) for side in ("chosen", "rejected"))


def _step_pieces(tok, record, cfg):
    """The prompt is the question plus the earlier steps (each followed by the separator); the completion the step.
    A chat question keeps the template's tokens, and the steps' tokens follow them, as they would in generation."""
    steps = "".join(step + cfg.step_separator for step in record["prefix"])
    if _is_chat(record["prompt"]):
        p = prompt_ids(tok, record["prompt"]) + _encode(tok, steps, "prefix")
    else:
        p = prompt_ids(tok, record["prompt"] + steps)
    return tuple(Piece(tuple(p), tuple(_with_eos(tok, _encode(tok, record[side], side), False, cfg)))
                 for side in ("chosen", "rejected"))


def _trajectory_piece(tok, record, cfg):
    """Each step is tokenized on its own (with the separator after all but the last), so the step boundaries
    are exact token positions; under "auto" the EOS closes the last step."""
    p = tuple(prompt_ids(tok, record["prompt"]))
    steps, ids, ends = record["steps"], [], []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        piece = _encode(tok, step if last else step + cfg.step_separator, f"steps[{i}]")
        if last:
            piece = _with_eos(tok, piece, True, cfg)
        if not piece:
            raise RowError("steps", "steps: empty step", f"field 'steps' item {i} is empty after tokenization")
        ids += piece
        ends.append(len(ids) - 1)
    return Piece(p, tuple(ids), tuple(ends))


def _tokenize_row(format: str, tok: TextTokenizer, record: dict, cfg: TokenizeConfig,
                  counts: collections.Counter) -> tuple[list[Piece], dict]:
    """The fitted pieces of one record and its per-row scalars."""
    if format in ("pairwise", "stepwise"):
        pieces = (_pair_pieces if format == "pairwise" else _step_pieces)(tok, record, cfg)
        return [fit(pieces[0], cfg, "chosen", counts), fit(pieces[1], cfg, "rejected", counts)], {}
    if format == "unpaired":
        piece = completion_piece(tok, record["prompt"], record["completion"], "completion", cfg)
        return [fit(piece, cfg, "completion", counts)], {"label": int(record["label"])}
    if format == "trajectory":
        return [fit(_trajectory_piece(tok, record, cfg), cfg, "steps", counts)], {"reward": record["reward"]}
    if format == "ranked":
        pieces = [fit(completion_piece(tok, record["prompt"], c, f"completions[{k}]", cfg), cfg,
                      f"completions[{k}]", counts) for k, c in enumerate(record["completions"])]
        return pieces, {"scores": record["scores"]}
    raise ValueError(f"unknown data format {format!r}; expected one of {formats.FORMATS}")


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Arrays padded to `max_length`, each row's real length (the longest of its sequences), its source line,
    and the report of skipped and truncated rows."""

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray
    lines: np.ndarray
    report: dict


def _assemble(format: str, rows: list[tuple[list[Piece], dict]], tok: TextTokenizer,
              cfg: TokenizeConfig) -> dict[str, np.ndarray]:
    L = cfg.max_length
    if format in ("pairwise", "stepwise"):
        arrays = {}
        for j, side in enumerate(("chosen", "rejected")):
            laid = _layout([pieces[j] for pieces, _ in rows], tok, L)
            arrays.update({f"{side}_{k}": laid[k] for k in ("tokens", "attention_mask", "completion_mask")})
        return arrays
    if format == "unpaired":
        laid = _layout([pieces[0] for pieces, _ in rows], tok, L)
        arrays = {k: laid[k] for k in ("tokens", "attention_mask", "completion_mask")}
        arrays["label"] = np.asarray([extra["label"] for _, extra in rows], np.int32)
        return arrays
    if format == "trajectory":
        arrays = _layout([pieces[0] for pieces, _ in rows], tok, L)
        arrays["reward"] = np.asarray([extra["reward"] for _, extra in rows], np.float32)
        return arrays
    # ranked: [N, K, L], rows with fewer than K completions padded with invalid (all-pad) lists.
    k = max(len(pieces) for pieces, _ in rows)
    n = len(rows)
    out = {f"list_{name}": np.zeros((n, k, L), np.int32) for name in ("tokens", "attention_mask", "completion_mask")}
    out["list_tokens"][:] = tok.pad_id
    out["list_scores"] = np.zeros((n, k), np.float32)
    out["list_valid"] = np.zeros((n, k), np.int32)
    for i, (pieces, extra) in enumerate(rows):
        laid = _layout(pieces, tok, L)
        for name in ("tokens", "attention_mask", "completion_mask"):
            out[f"list_{name}"][i, : len(pieces)] = laid[name]
        out["list_scores"][i, : len(pieces)] = extra["scores"]
        out["list_valid"][i, : len(pieces)] = 1
    return out


def tokenize_records(format: str, records: Sequence[dict], tok: TextTokenizer, cfg: TokenizeConfig,
                     on_error: str = "fail", source: str = "data") -> TokenizedData:
    """Tokenize every record; rows that cannot be tokenized fail (naming `source` and the row's line) or are
    skipped and counted, per `on_error`; too-long rows follow `cfg.on_overflow` instead."""
    formats.check_on_error(on_error)
    counts: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    first_errors: list[str] = []
    rows, lines = [], []
    for record in records:
        where = formats.location(source, record.get("line", 0))
        try:
            rows.append(_tokenize_row(format, tok, record, cfg, counts))
            lines.append(record.get("line", 0))
        except RowError as e:
            drop = cfg.on_overflow == "drop" if e.reason == "too long" else on_error == "skip"
            if not drop:
                raise formats.row_failure(source, where, e) from None
            skipped[e.reason] += 1
            if len(first_errors) < 5:
                first_errors.append(f"{os.path.basename(source)} {where}: {e.message}")
    if not rows:
        raise DataFormatError(f"{source}: no row could be tokenized (skipped by reason: {dict(skipped)})")
    lengths = np.asarray([max(len(p.prompt) + len(p.completion) for p in pieces) for pieces, _ in rows], np.int32)
    report = {"rows_in": len(records), "rows_kept": len(rows), "rows_skipped": int(sum(skipped.values())),
              "skipped_by_reason": dict(sorted(skipped.items())), "prompts_truncated": counts["prompts_truncated"],
              "completions_truncated": counts["completions_truncated"], "first_errors": first_errors}
    return TokenizedData(_assemble(format, rows, tok, cfg), lengths, np.asarray(lines, np.int64), report)


__all__ = ["EOS_POLICIES", "ON_OVERFLOW", "PROMPT_TRUNCATION", "Piece", "TextTokenizer", "TokenizeConfig",
           "TokenizedData", "char_tokenizer", "chat_ids", "completion_piece", "fit", "load_hf_tokenizer", "render_chat", "shared_prefix_length",
           "split_two_column", "tokenize_records"]
