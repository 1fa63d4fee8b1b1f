"""Baseline for `jaxalign bench dpo-throughput`: tokens/s of TRL's DPOTrainer (PyTorch, CPU, fp32).

Builds a randomly initialised `transformers.LlamaForCausalLM` equivalent to a jaxalign `ModelConfig` (grouped-query
attention, SwiGLU MLP, RMSNorm, rotary embeddings, no biases), a copy of it as the frozen reference model, and an
in-memory dataset of preference pairs whose prompts and completions have exactly the requested token counts, then
times DPOTrainer's optimisation steps after a warmup.

Setup, matching the JAX step where TRL lets us choose:
- fp32 weights and compute (DPOConfig's default bf16=True is turned off), attention via PyTorch's
  `scaled_dot_product_attention` (attn_implementation="sdpa"), no gradient checkpointing (TRL defaults it on),
  reference log-probs computed every step (precompute_ref_log_probs=False), loss_type="sigmoid", beta=0.1, AdamW.
- TRL 1.16 tokenizes text columns itself (it has no pre-tokenized input path for text-only preference data), so
  token ids are written as words ("t<id>", or "<eos>" etc. for the special ids 0-2) and split back by a word-level
  tokenizer built in memory: one word is one token, nothing is added around them. The last completion token is
  the tokenizer's EOS word, so TRL appends no EOS of its own and every sequence has exactly prompt_len +
  completion_len tokens: no padding in any batch (checked after TRL's preprocessing).
- TRL concatenates chosen and rejected into one batch of 2 * batch_pairs sequences for the policy and one for the
  reference, as we do. Unlike a plain forward, TRL 1.16's fused LM head projects only completion positions onto
  the vocabulary (and also computes entropy/top-1 metrics there), so at large vocab_size / prompt_len it does
  fewer LM-head FLOPs than `jaxalign.bench.flops` counts for the same tokens.

A "step" is one optimiser update (gradient_accumulation_steps=1): policy forward + backward, reference forward,
gradient clipping, AdamW update, LR scheduler, zero_grad and TRL's metric bookkeeping. Timing runs from
`on_step_begin` to `on_step_end`, so it excludes data loading/collation (the batch is fetched before
`on_step_begin`) and logging (off). Nothing is downloaded: the Hugging Face offline switches are set before import.

On a small shared CPU, torch's default of one intra-op thread per core can be far slower than threads=1 when other
processes compete for the cores (OpenMP workers wait on each other); pass `threads` and report it.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from typing import Any

from jaxalign.bench.report import import_offline

MISSING_EXTRA = "the TRL baseline needs the benchmark extra: pip install -e '.[bench]'"
MODEL_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_len",
              "rope_theta", "norm_eps", "tie_embeddings")
# Token ids reserved for the in-memory tokenizer (random tokens avoid them). Their words must not occur inside other
# words: tokenizers match special tokens anywhere in the text before splitting it into words.
_SPECIAL = {0: "<eos>", 1: "<pad>", 2: "<unk>"}
_EOS, _PAD, _UNK = 0, 1, 2


def _word(i: int) -> str:
    return _SPECIAL.get(i, f"t{i}")


def _import_extra():
    return import_offline(("datasets", "tokenizers", "torch", "transformers", "trl"), MISSING_EXTRA)


def _tokenizer(tokenizers, transformers, vocab_size: int):
    """Word-level tokenizer, word `_word(i)` <-> id i, split on whitespace; adds no tokens around the text."""
    vocab = {_word(i): i for i in range(vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=_word(_UNK)))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=_word(_EOS), pad_token=_word(_PAD), unk_token=_word(_UNK)
    )


def _llama(transformers, model: dict[str, Any], tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=model["vocab_size"],
        hidden_size=model["d_model"],
        intermediate_size=model["mlp_dim"],
        num_hidden_layers=model["n_layers"],
        num_attention_heads=model["n_heads"],
        num_key_value_heads=model["n_kv_heads"],
        head_dim=model["head_dim"],
        max_position_embeddings=model["max_len"],
        rope_parameters={"rope_type": "default", "rope_theta": float(model["rope_theta"])},
        rms_norm_eps=model["norm_eps"],
        tie_word_embeddings=bool(model["tie_embeddings"]),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def _step_timer(transformers, warmup: int):
    """A TrainerCallback that records the wall time of each optimisation step after the first `warmup` ones."""

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.durations, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            # state.global_step counts completed optimisation steps
            self._start = time.perf_counter() if state.global_step >= warmup else None

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.durations.append(time.perf_counter() - self._start)

    return StepTimer()


def _check_lengths(dataset, prompt_len: int, completion_len: int) -> None:
    """TRL must not have added or removed tokens: the throughput figures assume exact lengths and no padding."""
    for column, want in (("prompt_ids", prompt_len), ("chosen_ids", completion_len), ("rejected_ids", completion_len)):
        got = {len(ids) for ids in dataset[column]}
        if got != {want}:
            raise RuntimeError(f"TRL tokenized {column} to lengths {sorted(got)}, expected {want}")


def trl_dpo_tokens_per_second(
    model: dict,
    batch_pairs: int,
    prompt_len: int,
    completion_len: int,
    steps: int = 5,
    warmup: int = 2,
    threads: int | None = None,
) -> dict:
    """Train TRL's DPOTrainer for warmup + steps steps on CPU and return its throughput over the last `steps`.

    model: dict with keys vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp_dim, max_len, rope_theta,
        norm_eps, tie_embeddings (the fields of `jaxalign.models.llama.ModelConfig`).
    threads: torch intra-op threads (torch.set_num_threads, process-wide); None keeps torch's default.

    Returns {"tokens_per_second", "seconds_per_step" (mean over the timed steps), "tokens_per_step"
    (= 2 * batch_pairs * (prompt_len + completion_len): every prompt and completion token of the chosen and the
    rejected sequences, as jaxalign counts), "torch_threads"}.
    """
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise KeyError(f"model is missing {missing}")
    if min(batch_pairs, prompt_len, completion_len, steps) < 1 or warmup < 0:
        raise ValueError("batch_pairs, prompt_len, completion_len and steps must be >= 1 and warmup >= 0")
    if model["vocab_size"] <= _UNK + 1:
        raise ValueError(f"vocab_size must exceed {_UNK + 1} (ids 0-{_UNK} are EOS, PAD, UNK)")
    seq_len = prompt_len + completion_len
    if seq_len > model["max_len"]:
        raise ValueError(f"prompt_len + completion_len = {seq_len} exceeds max_len = {model['max_len']}")

    datasets, tokenizers, torch, transformers, trl = _import_extra()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    tokenizer = _tokenizer(tokenizers, transformers, model["vocab_size"])
    policy = _llama(transformers, model, tokenizer)
    reference = _llama(transformers, model, tokenizer)
    reference.load_state_dict(policy.state_dict())

    def words(n: int, eos: bool = False) -> str:
        ids = torch.randint(_UNK + 1, model["vocab_size"], (n - int(eos),), generator=generator).tolist()
        return " ".join(_word(i) for i in ids + ([_EOS] if eos else []))

    # Completions start with a space so that prompt + completion splits into prompt words then completion words.
    total = warmup + steps
    rows = [
        {"prompt": words(prompt_len), "chosen": " " + words(completion_len, eos=True),
         "rejected": " " + words(completion_len, eos=True)}
        for _ in range(batch_pairs * total)
    ]
    dataset = datasets.Dataset.from_list(rows)

    args = dict(
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing, which TRL defaults to True
        per_device_train_batch_size=batch_pairs,
        gradient_accumulation_steps=1,
        max_steps=total,
        num_train_epochs=1,
        max_length=seq_len,  # nothing is truncated: every sequence has exactly seq_len tokens
        pad_to_multiple_of=None,
        precompute_ref_log_probs=False,
        loss_type="sigmoid",
        beta=0.1,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    timer = _step_timer(transformers, warmup)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's dataset.map calls would draw three progress bars
    try:
        with tempfile.TemporaryDirectory(prefix="trl_dpo_bench_") as output_dir, warnings.catch_warnings():
            # transformers 5 deprecation notices raised from inside TRL 1.16 (gradient -> activation checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            trainer = trl.DPOTrainer(
                model=policy,
                ref_model=reference,
                args=trl.DPOConfig(output_dir=output_dir, **args),
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[timer],
            )
            _check_lengths(trainer.train_dataset, prompt_len, completion_len)
            trainer.remove_callback(transformers.PrinterCallback)  # added by disable_tqdm; prints the final logs
            trainer.train()
    finally:
        if bars:
            datasets.enable_progress_bars()

    durations = timer.durations
    if len(durations) != steps:
        raise RuntimeError(f"timed {len(durations)} steps, expected {steps}")
    seconds_per_step = sum(durations) / steps
    tokens_per_step = 2 * batch_pairs * seq_len
    return {
        "tokens_per_second": tokens_per_step / seconds_per_step,
        "seconds_per_step": seconds_per_step,
        "tokens_per_step": tokens_per_step,
        "torch_threads": torch.get_num_threads(),
    }
