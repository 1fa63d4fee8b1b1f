"""Text from any trained policy: a checkpoint of any LM experiment, or a Hugging Face model directory.

`load_policy(path)` finds the parameters without a `TrainState` template: `path` is a work directory, one of its
phase directories (WORKDIR/checkpoints/PHASE) or a step directory, and the checkpoint's own record names the model
(every LM phase stores its `ModelConfig`). A LoRA phase stores only the adapters: they are merged into their frozen
base, which is the run's `model.path` (dpo_files) or the run's SFT policy (the ARITH experiments). The tokenizer is
the run's: the built-in character tokenizer for the ARITH task, else the run's `model.tokenizer` / `model.path`.

`generate_text` encodes prompts (plain text, or a chat turn through the tokenizer's template), samples with the
KV-cache sampler (`jaxalign.sampling.generate`) and decodes up to and excluding EOS.

The work directory is read through `jaxalign.paths`, so `path` may be on an object store (gs://...); the model and
tokenizer sources a run names (model.path, model.tokenizer) are read locally, as the run read them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from jaxalign import paths
from jaxalign.data.tokenize import TextTokenizer, char_tokenizer, chat_ids, load_hf_tokenizer, prompt_ids
from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig
from jaxalign.models.lora import LoraConfig, merge_lora
from jaxalign.sampling import SamplingConfig, generate

_STATE, _META = "state", "meta"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameters of `DecoderLM(model)`, the tokenizer to talk to them with, and where they came from."""

    params: Any
    model: ModelConfig
    tokenizer: TextTokenizer
    source: str


def _is_step_dir(path: str) -> bool:
    return paths.isdir(paths.join(path, _STATE)) and paths.isdir(paths.join(path, _META))


def _steps(phase_dir: str) -> list[int]:
    return sorted(int(n) for n in paths.listdir(phase_dir)
                  if n.isdigit() and _is_step_dir(paths.join(phase_dir, n)))


def _modified(path: str) -> float:
    """When `path` last changed: its mtime locally; on an object store that of its newest object (a "directory"
    there is only a name prefix, with no time of its own; 0 where the backend reports none)."""
    if paths.is_local(path):
        return os.path.getmtime(path)
    times = [paths.as_path(paths.join(path, *f.split("/"))).stat().mtime for f in paths.files_under(path)]
    return max(times, default=0.0)


def resolve_step_dir(path: str, phase: str | None = None, step: int | None = None) -> str:
    """The step directory `path` names: itself, the newest (or `step`) of a phase directory, or of a work
    directory's phase `phase` (default: "dpo" if it exists, else the phase written last)."""
    path = os.path.abspath(path) if paths.is_local(path) else path
    if _is_step_dir(path):
        return path
    checkpoints = paths.join(path, "checkpoints")
    if paths.isdir(checkpoints):
        phases = [p for p in paths.listdir(checkpoints) if _steps(paths.join(checkpoints, p))]
        if not phases:
            raise ValueError(f"{checkpoints}: no checkpoint has been saved in this work directory yet")
        if phase is None:
            phase = "dpo" if "dpo" in phases else max(
                phases, key=lambda p: _modified(paths.join(checkpoints, p)))
        if phase not in phases:
            raise ValueError(f"{checkpoints}: no phase {phase!r}; phases with checkpoints: {', '.join(sorted(phases))}")
        path = paths.join(checkpoints, phase)
    if not paths.isdir(path):
        raise ValueError(f"--checkpoint {path}: no such directory")
    steps = _steps(path)
    if not steps:
        raise ValueError(f"{path}: not a checkpoint directory (no saved step, and no checkpoints/ of a work directory)")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ValueError(f"{path}: no step {chosen}; saved steps: {', '.join(map(str, steps))}")
    return paths.join(path, str(chosen))


def _read_meta(step_dir: str) -> dict:
    import orbax.checkpoint as ocp

    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(paths.absolute_path(paths.join(step_dir, _META)))
    run = meta.get("run", meta) if isinstance(meta, dict) else {}
    if not isinstance(run, dict) or "model" not in run:
        raise ValueError(f"{step_dir}: this checkpoint does not record a language model (no 'model' in its "
                         "metadata); generate reads LM phases only")
    return run


def _read_params(step_dir: str) -> Any:
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(paths.absolute_path(paths.join(step_dir, _STATE)))
    return jax.tree_util.tree_map(np.asarray, state["params"])


def _workdir_of(step_dir: str) -> str | None:
    """WORKDIR of WORKDIR/checkpoints/PHASE/STEP, if the step sits in a work directory."""
    checkpoints = paths.dirname(paths.dirname(step_dir))
    return paths.dirname(checkpoints) if checkpoints.rsplit("/", 1)[-1] == "checkpoints" else None


def _run_config(workdir: str | None) -> dict:
    if workdir is None or not paths.exists(paths.join(workdir, "config.json")):
        return {}
    return json.loads(paths.read_text(paths.join(workdir, "config.json")))


def _model_config(record: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields})


def run_tokenizer(run_config: dict, override: str | None = None) -> TextTokenizer:
    """`override` ("char" or a tokenizer.json / its directory), else the run's: the character tokenizer of the
    ARITH task, or the run's model.tokenizer / model.path."""
    if override == "char":
        return char_tokenizer()
    if override:
        return load_hf_tokenizer(override)
    model = run_config.get("model", {})
    source = model.get("tokenizer") or model.get("path") if isinstance(model, dict) else None
    if source:
        return load_hf_tokenizer(source)
    if "task" in run_config:
        return char_tokenizer()
    raise ValueError("cannot tell which tokenizer this run used; pass --tokenizer (a tokenizer.json or its "
                     "directory, or 'char' for the ARITH task)")


def _lora_base(run_config: dict, step_dir: str) -> Any:
    """The frozen base of a LoRA phase: the run's model.path, else its SFT policy (newest SFT checkpoint)."""
    model = run_config.get("model", {})
    if isinstance(model, dict) and model.get("path"):
        if os.path.isfile(os.path.join(model["path"], hf.NATIVE_CONFIG)):
            return jax.tree_util.tree_map(np.asarray, hf.load_native(model["path"])[0])
        return jax.tree_util.tree_map(np.asarray, hf.from_pretrained(model["path"])[0])
    sft = paths.join(paths.dirname(paths.dirname(step_dir)), "sft")
    if paths.isdir(sft) and _steps(sft):
        return _read_params(resolve_step_dir(sft))
    raise ValueError(f"{step_dir}: a LoRA checkpoint holds only adapters, and neither the run's model.path nor an "
                     "SFT checkpoint beside it gives their base")


def load_policy(path: str, phase: str | None = None, step: int | None = None,
                tokenizer: str | None = None) -> Policy:
    """The policy of a checkpoint (module docstring): parameters (LoRA merged), model config and tokenizer."""
    step_dir = resolve_step_dir(path, phase, step)
    record = _read_meta(step_dir)
    run_config = _run_config(_workdir_of(step_dir))
    params = _read_params(step_dir)
    if record.get("lora"):
        lora = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["lora"].items()})
        params = merge_lora(_lora_base(run_config, step_dir), params, lora)
    return Policy(params, _model_config(record["model"]), run_tokenizer(run_config, tokenizer), step_dir)


def load_hf_policy(path: str, tokenizer: str | None = None) -> Policy:
    """A Hugging Face model directory (or a `jaxalign convert` one) with the tokenizer beside it (or `tokenizer`)."""
    if os.path.isfile(os.path.join(path, hf.NATIVE_CONFIG)):
        params, model, _ = hf.load_native(path)
    else:
        params, model = hf.from_pretrained(path)
    return Policy(params, model, run_tokenizer({}, tokenizer or path), os.path.abspath(path))


def encode_prompts(tok: TextTokenizer, prompts: Sequence[str], chat: bool = False,
                   system: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (tokens, mask) [B, P] for the sampler: each prompt as text (with BOS when the tokenizer adds
    one), or, with `chat`, as a user turn (after an optional system turn) up to the assistant's generation prompt."""
    rows = []
    for text in prompts:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            rows.append(chat_ids(tok, messages, add_generation_prompt=True)[0])
        else:
            rows.append(prompt_ids(tok, text))
    if any(not row for row in rows):
        raise ValueError("a prompt is empty after tokenization; the model needs at least one token to continue")
    width = max(len(row) for row in rows)
    tokens = np.full((len(rows), width), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return tokens, mask


def generate_text(policy: Policy, prompts: Sequence[str], sampling: SamplingConfig, seed: int = 0,
                  chat: bool = False, system: str | None = None) -> list[str]:
    """One completion per prompt (module docstring), decoded without its EOS."""
    tok = policy.tokenizer
    tokens, mask = encode_prompts(tok, prompts, chat, system)
    if tokens.shape[1] + sampling.max_new_tokens > policy.model.max_len:
        raise ValueError(f"the longest prompt ({tokens.shape[1]} tokens) plus max_new_tokens "
                         f"({sampling.max_new_tokens}) exceeds the model's context of {policy.model.max_len}")
    out, out_mask = generate(policy.params, tokens, mask, jax.random.key(seed), cfg=policy.model, sampling=sampling,
                             eos_id=tok.eos_id, pad_id=tok.pad_id, num_tokens=tok.vocab_size)
    texts = []
    for ids, keep in zip(np.asarray(out), np.asarray(out_mask)):
        ids = [int(i) for i, k in zip(ids, keep) if k]
        if ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    return texts


__all__ = ["Policy", "encode_prompts", "generate_text", "load_hf_policy", "load_policy", "resolve_step_dir",
           "run_tokenizer"]
