"""DPO on your own data and model: a Hugging Face (or `jaxalign convert`) checkpoint and a local preference file.

    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=pairs.jsonl [key=value ...]
    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=steps.jsonl data.format=stepwise
    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=lists.jsonl data.format=ranked \
        loss=plackett_luce dpo.list_batch_size=16
    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=labels.jsonl data.format=unpaired loss=kto

Four of `jaxalign data prepare`'s formats train here (`data.format`, `jaxalign.data.tokenize` for the layouts):
- pairwise (prompt, chosen, rejected): every pairwise, reference-free or unpaired objective reading the pairs.
- stepwise (prompt, prefix steps, chosen step, rejected step): Step-DPO (Lai et al. 2024, eq. 2) is DPO whose
  prompt is the question plus the earlier correct steps and whose completions are the next step only; the layout is
  the pairwise one, so it trains and is evaluated exactly like pairwise rows with the same objectives.
- ranked (prompt, K completions, K scores): the listwise objectives that read nothing but the lists (adpo,
  plackett_luce, rankdpo), `dpo.list_batch_size` lists per step. A pairwise objective on ranked data is refused
  rather than silently reduced to pairs (which pairs to take is a modelling choice: write them as a pairwise file);
  tpo is refused too, as it needs reasoning-step ids and hidden states that a ranked file does not define.
- unpaired (prompt, completion, label: true desirable / false undesirable): the unpaired objectives that need
  nothing but the labelled completions, `dpo.batch_size` completions per step (`jaxalign.train.unpaired`). kto
  (Ethayarajh et al. 2024, eqs. 7-8) reads its reference point from MISMATCHED sequences: the training rows are
  shuffled (seeded) and cut into chunks of `dpo.batch_size`, and within a chunk each row's prompt is followed by the
  completion of the row before it (section 3; TRL rotates completions the same way when it prepares the data), the
  KL estimate being the batch mean of their policy-minus-reference log-probs, clamped at 0 and without gradient;
  bco (Jung et al. 2024) keeps its running reward baseline in the train state. dro is refused: it needs a scalar
  reward per completion and a value head that an unpaired file does not carry.
A mismatch of data.format and loss is one error before the work directory is created.

Pipeline (re-running the same command continues a killed run from its latest checkpoint):
1. Load the model, sharded over the mesh: a Hugging Face directory (config.json + safetensors, `from_pretrained`)
   or a `jaxalign convert hf-to-jaxalign` directory (jaxalign_config.json + params.safetensors, `load_native`).
2. Validate and tokenize the file (`jaxalign.data.pipeline.prepare_dataset`: a TFDS array_record build under
   `data.dataset_dir`, default WORKDIR/data, reused while the file is unchanged) with the tokenizer of
   `model.tokenizer` (default: the model directory). Skipped rows and truncations are counted in results.json.
3. Split off `data.eval_fraction` of the rows (pairs, lists or completions) as held-out rows (a seeded
   permutation: the same split every run).
4. The shared preference phase (`jaxalign.train.preference`) with `dpo.objective` (default sigmoid DPO; any
   registered pairwise, reference-free or unpaired objective whose inputs are the pairs themselves), the loaded
   model being the reference: its log-probs cached on disk ("cached", default), a frozen copy run every step
   ("online") or TR-DPO's periodic sync ("sync"). `lora.rank` > 0 trains adapters only, the loaded model being their
   frozen base and the reference (one copy of the weights). `dpo.select_best=true` returns the step with the lowest
   held-out loss instead of the last one.
5. Every `dpo.eval_every` steps, and at step 0 and the last step, the held-out pairs are scored under the sigmoid DPO
   loss with `dpo.beta` (unset: the objective's own beta, else 0.1) against the loaded model: loss (log 2 at step 0,
   where policy = reference), reward accuracy (share of pairs whose chosen reward exceeds the rejected one; 0 at step
   0, where all rewards are 0) and mean reward margin. Held-out ranked lists are scored under the trained listwise
   objective itself (its hyper-parameters, the summed log-probs of every valid completion under policy and loaded
   model): loss, top-1 accuracy (share of lists with a strict preference whose best-scored completion has the highest
   implicit reward beta * (log pi - log ref), strictly; 0 at step 0), pair accuracy over the strictly ordered pairs
   and the best-minus-worst reward margin; `dpo.select_best` then selects on that held-out listwise loss. Held-out
   unpaired completions are scored as ONE batch under the trained unpaired objective itself (its hyper-parameters;
   kto's reference point from the held-out rows' own mismatched sequences, built as for training; bco's baseline from
   a fresh state folding in that batch, i.e. the held-out mean reward), with the implicit rewards r = beta * (log pi
   - log ref) of the summed completion log-probs: loss (kto: the mean of the desirable / undesirable weights times
   1/2 at step 0; bco: log 2), reward accuracy (share of completions whose reward has the sign of its label,
   strictly: r > 0 desirable, r < 0 undesirable; 0 at step 0) and the reward margin (mean reward of the desirable
   completions minus that of the undesirable ones; 0 at step 0), with both means; `dpo.select_best` selects on that
   held-out loss. results.json reports before/after, dpo_heldout.png plots them.
6. With `export.enabled=true`, the trained policy (adapters merged) is written to WORKDIR/export as a Hugging Face
   checkpoint of the source family (`save_pretrained`), with the tokenizer files beside it (staged locally and
   copied up when WORKDIR is on an object store: ExportSection).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import ClassVar

import numpy as np

from jaxalign import paths
from jaxalign.algorithms import objective_extras
from jaxalign.data.sources import SourceOptions, check_source
from jaxalign.data.pipeline import SEQUENCE_SUFFIXES, BucketedDataset, fingerprint
from jaxalign.data.tokenize import TokenizeConfig
from jaxalign.distributed import host_local, is_primary
from jaxalign.experiments.files_kit import (ExportSection, ModelSection, check_context, check_data_section,
                                            data_and_model_summary, export_family, export_policy, load_model,
                                            load_tokenizer, model_format, split_rows, tokenize_config,
                                            tokenizer_path)
from jaxalign.losses import ListwiseInputs, UnpairedInputs, get_spec, initial_state, update_state
from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig, check_model_fits_mesh
from jaxalign.rundir import RunDir, claim, config_to_dict, params_sha256, write_json_atomic
from jaxalign.sharding import MeshConfig, check_batch_fits_mesh, make_mesh
from jaxalign.train.checkpoint import CheckpointConfig
from jaxalign.train.loop import MetricsLog
from jaxalign.train.preference import (Evaluation, LoraSection, PreferenceConfig, implicit_reward_beta,
                                       train_preference)
from jaxalign.train.step import extra_params_needed
from jaxalign.train.unpaired import MISMATCHED_KEYS, mismatch_partners, mismatched_unpaired, unpaired_missing_extras

EVAL_KEYS = ("eval/loss", "eval/reward_accuracy", "eval/reward_margin", "eval/chosen_reward",
             "eval/rejected_reward")
LIST_EVAL_KEYS = ("eval/loss", "eval/top1_accuracy", "eval/reward_margin", "eval/pair_accuracy")
UNPAIRED_EVAL_KEYS = ("eval/loss", "eval/reward_accuracy", "eval/reward_margin", "eval/desirable_reward",
                      "eval/undesirable_reward")
# The formats that train here; trajectory files are validated by `jaxalign data prepare` only.
TRAIN_FORMATS = ("pairwise", "stepwise", "ranked", "unpaired")
UNPAIRED_ARRAYS = ("tokens", "attention_mask", "completion_mask")
LIST_ARRAYS = ("list_tokens", "list_attention_mask", "list_completion_mask")


def file_listwise_objectives() -> list[str]:
    """The registered listwise objectives that read nothing beyond the lists and the reference."""
    from jaxalign.losses import registry

    return sorted(n for n, s in registry.SPECS.items() if s.family == "listwise" and not s.extras)


def file_unpaired_objectives() -> list[str]:
    """The registered unpaired objectives that train on labelled completions alone (`unpaired_missing_extras`)."""
    from jaxalign.losses import registry

    return sorted(n for n, s in registry.SPECS.items() if s.family == "unpaired" and not unpaired_missing_extras(n))


def check_unpaired_objective(name: str) -> None:
    """data.format=unpaired: only the unpaired objectives whose inputs are the labelled completions."""
    spec = get_spec(name)
    usable = ", ".join(file_unpaired_objectives())
    if spec.family != "unpaired":
        held = "ranked lists" if spec.family == "listwise" else "pairs"
        raise ValueError(f"loss={name} (dpo.objective) is {spec.family} and trains on {held}, but "
                         f"data.format=unpaired holds single completions labelled desirable or undesirable; use an "
                         f"unpaired objective ({usable})")
    missing = unpaired_missing_extras(name)
    if missing:
        raise ValueError(f"loss={name} (dpo.objective) needs {', '.join(missing)} (a scalar reward per completion "
                         f"and a value head) beyond the labelled completions of data.format=unpaired, which "
                         f"dpo_files does not build; use {usable}")


def check_objective(name: str, format: str = "pairwise") -> None:
    """Refuse an objective whose family does not match `format` (listwise on pairs, pairwise on lists) and objectives
    that need more than the rows and the reference: extras this experiment does not build (KTO's mismatched
    sequences from pairs: only unpaired rows get them; reward models, judged scores, value heads, TPO's step ids and
    hidden states). data.format=unpaired takes the unpaired objectives `check_unpaired_objective` allows. One error
    naming data.format and loss, or what the objective needs."""
    if format == "unpaired":
        return check_unpaired_objective(name)
    spec = get_spec(name)
    if format == "ranked":
        if spec.family != "listwise":
            raise ValueError(f"loss={name} (dpo.objective) is {spec.family} and trains on pairs, but "
                             f"data.format=ranked holds ranked lists; use a listwise objective "
                             f"({', '.join(file_listwise_objectives())})")
        if spec.extras:
            raise ValueError(f"loss={name} (dpo.objective) needs {', '.join(spec.extras)} (reasoning steps cut by a "
                             f"separator token) beyond the ranked lists, which dpo_files does not build; use "
                             f"{', '.join(file_listwise_objectives())}")
        return
    if spec.family == "listwise":
        raise ValueError(f"loss={name} (dpo.objective) is listwise and trains on ranked lists, but "
                         f"data.format={format} holds pairs; use data.format=ranked with a ranked file, or a "
                         f"pairwise objective")
    unsupported = [builder.needs for builder in objective_extras.builders_for(spec)] + list(extra_params_needed(name))
    if spec.family == "unpaired" and "kl_policy" in spec.extras:
        raise ValueError(f"loss={name} (dpo.objective) needs {', '.join(unsupported)}, which dpo_files builds from "
                         f"unpaired rows only, but data.format={format} holds pairs; write them as unpaired rows "
                         f"(chosen: label true, rejected: label false) with data.format=unpaired, or use arith_dpo")
    if unsupported:
        raise ValueError(f"dpo.objective={name!r} needs {', '.join(unsupported)} "
                         f"beyond the preference pairs, which dpo_files does not build; use arith_dpo for it, or "
                         f"another objective")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The preference file and how it becomes token arrays (`jaxalign.data.tokenize`).

    path: a .jsonl or .parquet file in `format`, or a Hugging Face `datasets` save_to_disk directory
        (`jaxalign.data.sources`).
    format: the rows' format: "pairwise" (prompt, chosen, rejected), "stepwise" (prompt, prefix, chosen and rejected
        next step: Step-DPO), "ranked" (prompt, completions, scores: listwise objectives) or "unpaired" (prompt,
        completion, label: kto, bco)
    on_error: a malformed row stops the run naming file, line and field ("fail") or is skipped and counted ("skip")
    max_length: tokens of prompt + completion per sequence; longer rows are handled by `on_overflow`
    max_prompt_length: tokens of the prompt at most (None: max_length - 1); a longer prompt is cut
    prompt_truncation: what a cut prompt keeps, "keep_end" (the question is usually last) or "keep_start";
        a cut completion keeps its start
    on_overflow: a row over the limits is truncated and counted ("truncate"), dropped and counted ("drop") or
        refused naming its line ("error")
    eval_fraction: share of the rows (at least one) held out for evaluation, split by a permutation seeded by `seed`
    dataset_dir: where the TFDS build goes (default WORKDIR/data; point it at a `jaxalign data prepare --output`
        directory to reuse that build).
    split: the split of a `datasets` DatasetDict directory (default "train"; a missing one lists those there)
    columns: "field=column,...": read each field from that column, e.g. "prompt=question,chosen=good,rejected=bad"
    shape: how the rows hold the data: "native" (the format's fields), "binarized" (pairwise from chosen/rejected
        conversations with score_chosen/score_rejected) or "ratings" (one row per prompt, completion, rating:
        best vs worst per prompt for pairwise, rating >= desirable_threshold for unpaired)
    min_score_gap: binarized, or ratings to pairwise: pairs whose score gap is below this are dropped and counted
    desirable_threshold: ratings to unpaired: the rating from which a completion is desirable (required there)"""

    path: str = ""
    format: str = "pairwise"
    on_error: str = "fail"
    max_length: int = 512
    max_prompt_length: int | None = None
    prompt_truncation: str = "keep_end"
    on_overflow: str = "truncate"
    eval_fraction: float = 0.1
    dataset_dir: str = ""
    split: str = "train"
    columns: str = ""
    shape: str = "native"
    min_score_gap: float | None = None
    desirable_threshold: float | None = None

    def __post_init__(self):
        if self.format not in TRAIN_FORMATS:
            raise ValueError(f"data.format must be one of {TRAIN_FORMATS} (the formats dpo_files trains on), got "
                             f"{self.format!r}")
        check_data_section(self)
        self.tokenize_config()  # TokenizeConfig's own checks of the lengths
        self.source_options()

    def tokenize_config(self) -> TokenizeConfig:
        return tokenize_config(self)

    def source_options(self) -> SourceOptions:
        """The split, column mapping and shape options (`jaxalign.data.sources`), checked against `format`."""
        options = SourceOptions(split=self.split, columns=self.columns, shape=self.shape,
                                min_score_gap=self.min_score_gap, desirable_threshold=self.desirable_threshold)
        try:
            options.check(self.format)
        except ValueError as e:
            raise ValueError(f"data.{e}") from None
        return options


# The preference phase for a user's model: the library's defaults (beta 0.1, no chosen-NLL term, AdamW 5e-6), small
# batches, and the last step returned (dpo.select_best=true selects the step with the lowest held-out loss instead).
FILES_DPO = PreferenceConfig(steps=100, batch_size=8, select_best=False)


@dataclasses.dataclass(frozen=True)
class DPOFilesConfig:
    """Everything `dpo_files` needs; every field can be overridden from the command line (key=value)."""

    seed: int = 0  # the held-out split, the batch order and the initialisation of new parameters (LoRA adapters)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    dpo: PreferenceConfig = FILES_DPO
    lora: LoraSection = LoraSection()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=50, keep_last=2)
    export: ExportSection = ExportSection()
    eval_batch_size: int = 32  # pairs per forward pass when caching the reference's and scoring held-out log-probs
    show_progress: bool = True  # progress bars with rate and ETA on the terminal (never part of the result)
    log_every: int = 10  # metrics.jsonl gets a record every this many steps (and at every evaluation step)

    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"loss": "dpo.objective"}


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers.


def take_rows(data: BucketedDataset, rows: np.ndarray) -> BucketedDataset:
    """The given rows, with the sequence arrays (time last: [N, L] pairs, [N, K, L] lists) cut to the longest of them
    (no all-padding columns)."""
    width = max(int(np.max(data.lengths[rows])), 2)
    arrays = {k: v[rows][..., :width] if k.endswith(SEQUENCE_SUFFIXES) else v[rows] for k, v in data.arrays.items()}
    return BucketedDataset(arrays, data.lengths[rows])


def unpaired_rows(data: BucketedDataset, rows: np.ndarray, chunk: int | None, seed: int) -> BucketedDataset:
    """The given rows (`take_rows`); with `chunk`, each also carries its mismatched sequence for KTO's reference
    point (`jaxalign.train.unpaired.mismatch_partners`: prompts and completions rotated within seeded chunks of
    `chunk` rows), a row's length being the longer of its two sequences."""
    if chunk is None:
        return take_rows(data, rows)
    arrays = {k: v[rows] for k, v in data.arrays.items()}
    mismatched = mismatched_unpaired(arrays, mismatch_partners(len(rows), chunk, seed))
    lengths = np.maximum(data.lengths[rows], mismatched["kl_attention_mask"].sum(axis=1))
    return take_rows(BucketedDataset({**arrays, **mismatched}, lengths), np.arange(len(rows)))


def unpaired_metrics(policy, reference, labels, objective: str, objective_kwargs: dict, beta: float,
                     kl_policy=None, kl_reference=None) -> dict[str, float]:
    """Held-out metrics of labelled completions from their summed completion log-probs [N] under policy and
    reference: the unpaired `objective` itself on the N completions as one batch (each completion given as one
    "token" holding its sum; KTO's reference point from `kl_policy` / `kl_reference`, the summed log-probs of their
    mismatched sequences; a stateful objective's state starts fresh and folds in this batch, so BCO's baseline is
    the batch's mean reward), and, with implicit rewards r = beta * (policy - reference): reward accuracy (share of
    completions with r > 0 if desirable, r < 0 if not), the mean rewards of desirable and undesirable completions
    (0 for a kind with none) and their difference, the reward margin."""
    import jax.numpy as jnp

    policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    good = np.asarray(labels) > 0
    extras = {} if kl_policy is None else {"kl_policy": jnp.asarray(kl_policy, jnp.float32),
                                           "kl_reference": jnp.asarray(kl_reference, jnp.float32)}
    inputs = UnpairedInputs(policy=jnp.asarray(policy[:, None], jnp.float32),
                            reference=jnp.asarray(reference[:, None], jnp.float32),
                            mask=jnp.ones((len(policy), 1), jnp.int32), desirable=jnp.asarray(good, jnp.float32),
                            extras=extras)
    spec = get_spec(objective)
    if spec.state is not None:
        _, inputs = update_state(objective, initial_state(objective), inputs, objective_kwargs)
    loss, _ = spec.fn(inputs, **objective_kwargs)
    rewards = beta * (policy - reference)
    desirable = float(np.mean(rewards[good])) if good.any() else 0.0
    undesirable = float(np.mean(rewards[~good])) if (~good).any() else 0.0
    return {"eval/loss": float(loss), "eval/reward_accuracy": float(np.mean(np.where(good, rewards > 0, rewards < 0))),
            "eval/reward_margin": desirable - undesirable, "eval/desirable_reward": desirable,
            "eval/undesirable_reward": undesirable}


def pair_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                 beta: float) -> dict[str, float]:
    """The sigmoid DPO loss and DPO's implicit rewards r = beta * (log pi(y|x) - log ref(y|x)) over pairs, from
    summed completion log-probs: loss, reward accuracy (share with chosen reward > rejected), mean margin."""
    chosen = beta * (np.asarray(policy_chosen, np.float64) - np.asarray(reference_chosen, np.float64))
    rejected = beta * (np.asarray(policy_rejected, np.float64) - np.asarray(reference_rejected, np.float64))
    margin = chosen - rejected
    return {"eval/loss": float(np.mean(np.logaddexp(0.0, -margin))),
            "eval/reward_accuracy": float(np.mean(chosen > rejected)),
            "eval/reward_margin": float(np.mean(margin)),
            "eval/chosen_reward": float(np.mean(chosen)), "eval/rejected_reward": float(np.mean(rejected))}


def list_metrics(policy, reference, scores, valid, objective: str, objective_kwargs: dict,
                 beta: float) -> dict[str, float]:
    """Held-out metrics of ranked lists from the summed completion log-probs [N, K] of policy and reference:
    the listwise `objective` itself with its hyper-parameters (it reads only the summed log-ratios z, so each
    completion is given as one "token" holding its sum), and, with implicit rewards r = beta * (policy - reference)
    over the lists with a strict preference: top-1 accuracy (the best-scored completions' highest reward strictly
    above every other completion's), pair accuracy (share of strictly ordered pairs with r_better > r_worse) and the
    mean reward margin of the top- over the bottom-scored completion (ties: the lowest index, as the objectives)."""
    import jax.numpy as jnp

    policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    valid, scores = np.asarray(valid) > 0, np.where(np.asarray(valid) > 0, np.asarray(scores, np.float64), 0.0)
    inputs = ListwiseInputs(policy=jnp.asarray(policy[..., None], jnp.float32),
                            reference=jnp.asarray(reference[..., None], jnp.float32),
                            mask=jnp.asarray(valid[..., None], jnp.int32), scores=jnp.asarray(scores, jnp.float32),
                            valid=jnp.asarray(valid, jnp.int32))
    loss, _ = get_spec(objective).fn(inputs, **objective_kwargs)
    rewards = beta * np.where(valid, policy - reference, 0.0)
    better = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] > scores[:, None, :])
    used = better.any(axis=(1, 2))
    top_score = np.max(np.where(valid, scores, -np.inf), axis=1, keepdims=True)
    is_top = valid & (scores == top_score)
    top1 = (np.max(np.where(is_top, rewards, -np.inf), axis=1)
            > np.max(np.where(valid & ~is_top, rewards, -np.inf), axis=1))
    rows = np.arange(len(scores))
    best = np.argmax(np.where(valid, scores, -np.inf), axis=1)
    worst = np.argmin(np.where(valid, scores, np.inf), axis=1)
    margin = rewards[rows, best] - rewards[rows, worst]
    ordered = better & (rewards[:, :, None] > rewards[:, None, :])
    n_used = max(int(used.sum()), 1)
    return {"eval/loss": float(loss), "eval/top1_accuracy": float(np.sum(top1 & used) / n_used),
            "eval/reward_margin": float(np.sum(np.where(used, margin, 0.0)) / n_used),
            "eval/pair_accuracy": float(ordered.sum() / max(int(better.sum()), 1))}


def summed_list_logprobs(params, model_cfg: ModelConfig, arrays: dict, batch_size: int) -> np.ndarray:
    """[N, K] summed completion log-probs of every valid completion of every list under `params` (0 where a list
    has no completion k: those all-padding rows are never run)."""
    valid = np.asarray(arrays["list_valid"]) > 0
    out = np.zeros(valid.shape, np.float32)
    out[valid] = objective_extras.summed_logprobs(params, model_cfg, *(arrays[k][valid] for k in LIST_ARRAYS),
                                                  batch_size)
    return out


def summed_pair_logprobs(params, model_cfg: ModelConfig, arrays: dict, batch_size: int) -> tuple[np.ndarray, ...]:
    """(chosen, rejected) summed completion log-probs of every pair under `params`."""
    return tuple(objective_extras.summed_logprobs(params, model_cfg, arrays[f"{side}_tokens"],
                                                  arrays[f"{side}_attention_mask"],
                                                  arrays[f"{side}_completion_mask"], batch_size)
                 for side in ("chosen", "rejected"))


def summed_unpaired_logprobs(params, model_cfg: ModelConfig, arrays: dict, batch_size: int,
                             keys: tuple[str, ...] = UNPAIRED_ARRAYS) -> np.ndarray:
    """[N] summed completion log-probs of every labelled completion (or, with MISMATCHED_KEYS, of every row's
    mismatched sequence) under `params`."""
    return objective_extras.summed_logprobs(params, model_cfg, *(arrays[k] for k in keys), batch_size)


def check_tokens_fit_model(arrays: dict, model_cfg: ModelConfig, tokenizer_path: str) -> None:
    """Every token id must have an embedding row: a tokenizer that does not belong to the model is one error."""
    top = max(int(np.max(v)) for k, v in arrays.items() if k.endswith("tokens"))
    if top >= model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_path} produced token id {top}, but the model's vocabulary has "
                         f"{model_cfg.vocab_size} ids; model.tokenizer must be the model's own tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def row_unit(cfg: DPOFilesConfig) -> str:
    """What one row of the data is, for messages and results keys."""
    return {"ranked": "lists", "unpaired": "completions"}.get(cfg.data.format, "pairs")


def step_batch(cfg: DPOFilesConfig) -> tuple[str, int]:
    """(setting, rows per step): listwise objectives take `dpo.list_batch_size` lists, the others pairs."""
    return ("dpo.list_batch_size", cfg.dpo.list_batch_size) if cfg.dpo.listwise else ("dpo.batch_size",
                                                                                      cfg.dpo.batch_size)


def load_pairs(cfg: DPOFilesConfig, workdir: str, model_cfg: ModelConfig, tok):
    """(train rows, held-out rows, data report): the file validated, tokenized with `tok` and split; rows are pairs
    (pairwise, stepwise), ranked lists or labelled completions (unpaired; with their mismatched sequences when the
    objective reads KTO's reference point)."""
    from jaxalign.data.pipeline import prepare_dataset

    source = tokenizer_path(cfg)
    data_dir = cfg.data.dataset_dir or paths.join(workdir, "data")
    dataset, report = prepare_dataset(cfg.data.format, cfg.data.path, data_dir, tok, cfg.data.tokenize_config(),
                                      on_error=cfg.data.on_error, source_options=cfg.data.source_options())
    check_tokens_fit_model(dataset.arrays, model_cfg, source)
    unit = row_unit(cfg)
    if len(dataset) < 2:
        raise ValueError(f"{cfg.data.path}: {len(dataset)} usable {unit}; at least 2 are needed (one to train on, "
                         f"one held out)")
    train_rows, eval_rows = split_rows(len(dataset), cfg.data.eval_fraction, cfg.seed)
    if cfg.data.format == "unpaired":
        mismatched = "kl_policy" in get_spec(cfg.dpo.objective).extras
        train = unpaired_rows(dataset, train_rows, cfg.dpo.batch_size if mismatched else None, cfg.seed)
        held_out = unpaired_rows(dataset, eval_rows, len(eval_rows) if mismatched else None, cfg.seed)
    else:
        train, held_out = take_rows(dataset, train_rows), take_rows(dataset, eval_rows)
    setting, batch = step_batch(cfg)
    if len(train) < batch:
        raise ValueError(f"{cfg.data.path}: {len(train)} training {unit} (after holding out {len(held_out)}) are "
                         f"fewer than {setting}={batch}")
    report = dict(report, tokenizer=source, **{f"train_{unit}": len(train), f"eval_{unit}": len(held_out)},
                  batching=train.epoch_stats(batch))
    return train, held_out, report


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


def validate_config(cfg: DPOFilesConfig, mesh) -> None:
    """The checks that need the files or the mesh (the config sections check their own values)."""
    if not cfg.model.path:
        raise ValueError("model.path is required: a Hugging Face checkpoint directory or a `jaxalign convert "
                         "hf-to-jaxalign` output")
    model_format(cfg.model.path)
    if not cfg.data.path:
        raise ValueError(f"data.path is required: a .jsonl or .parquet file of {cfg.data.format} preferences")
    if not os.path.exists(cfg.data.path):
        raise ValueError(f"data.path={cfg.data.path!r} does not exist")
    check_source(cfg.data.path, cfg.data.source_options())  # a missing split or column, before the workdir
    check_objective(cfg.dpo.objective, cfg.data.format)
    if cfg.data.format == "unpaired":
        check_unpaired_settings(cfg.dpo)
    setting, batch = step_batch(cfg)
    check_batch_fits_mesh(batch // cfg.dpo.grad_accum_steps, mesh, f"{setting} / grad_accum_steps")


def check_unpaired_settings(dpo: PreferenceConfig) -> None:
    """The preference settings that only pairs can use, refused for unpaired rows before anything is written."""
    for name, value, off in (("sft_weight", dpo.sft_weight, "0"), ("logprob_chunk", dpo.logprob_chunk, "0"),
                             ("packing", dpo.packing, "false")):
        if value:
            raise ValueError(f"dpo.{name}={value} applies to pairs; data.format=unpaired trains without it: set "
                             f"dpo.{name}={off}")
    if get_spec(dpo.objective).state is not None and dpo.grad_accum_steps != 1:
        raise ValueError(f"loss={dpo.objective} keeps a running state that folds in one batch per step; set "
                         f"dpo.grad_accum_steps=1 (got {dpo.grad_accum_steps})")


def check_model(cfg: DPOFilesConfig, model_cfg: ModelConfig, family: str | None, mesh) -> str | None:
    """Checks that need the model's config; returns the export family (None when not exporting)."""
    check_model_fits_mesh(model_cfg, mesh)
    check_context(cfg, model_cfg.max_len)
    return export_family(cfg, family)


def run(cfg: DPOFilesConfig, workdir: str) -> dict:
    """Run (or resume) DPO on `data.path` from `model.path` in `workdir`; returns and writes results.json."""
    clock = time.perf_counter()
    mesh = make_mesh(cfg.mesh)
    validate_config(cfg, mesh)
    # Everything that can fail from the inputs alone fails before the directory is claimed, so the corrected
    # command is not refused as another run: the tokenizer, and a Hugging Face config this code cannot convert.
    tok = load_tokenizer(cfg)
    if model_format(cfg.model.path) != "jaxalign":
        hf.read_hf_config(cfg.model.path)
    paths.makedirs(workdir)
    claim(cfg, workdir)
    base, model_cfg, family = load_model(cfg, mesh)
    export_family = check_model(cfg, model_cfg, family, mesh)
    train, held_out, data_report = load_pairs(cfg, workdir, model_cfg, tok)
    log = MetricsLog(RunDir(workdir).metrics)

    policy, state_params, history = train_dpo(cfg, mesh, model_cfg, base, train, held_out,
                                              data_report["tokenizer_sha256"], workdir, log)
    before, after = history[0], history[-1]
    keys, unit = eval_keys(cfg), row_unit(cfg)
    results = {
        **{f"eval_{k.split('/')[1]}_before": before[k] for k in keys[:3]},
        **{f"eval_{k.split('/')[1]}_after": after[k] for k in keys[:3]},
        "eval_before": before, "eval_after": after, "eval_history": history,
        **train_loss_summary(log.records("dpo")),
        f"train_{unit}": data_report[f"train_{unit}"], f"eval_{unit}": data_report[f"eval_{unit}"],
        **data_and_model_summary(cfg, data_report, base, state_params, family),
        "steps": cfg.dpo.steps,
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(policy),
        "config": config_to_dict(cfg),
    }
    if export_family is not None:
        results["export"] = export_policy(policy, model_cfg, export_family, cfg, workdir, tok)
    if is_primary():
        write_json_atomic(RunDir(workdir).results, results)
        _plot(history, log.records("dpo"), RunDir(workdir).file("dpo_heldout.png"), keys[1],
              listwise=cfg.dpo.listwise, objective=cfg.dpo.objective if cfg.data.format == "unpaired" else None)
    return results


def eval_keys(cfg: DPOFilesConfig) -> tuple[str, ...]:
    if cfg.data.format == "unpaired":
        return UNPAIRED_EVAL_KEYS
    return LIST_EVAL_KEYS if cfg.dpo.listwise else EVAL_KEYS


def heldout_evaluation(cfg: DPOFilesConfig, model_cfg: ModelConfig, base, held_out: BucketedDataset):
    """policy params -> held-out metrics against `base` (pairs: `pair_metrics`; lists: `list_metrics`; labelled
    completions: `unpaired_metrics`)."""
    from jaxalign.train.preference import objective_kwargs

    if cfg.data.format == "unpaired":
        return unpaired_evaluation(cfg, model_cfg, base, held_out.arrays, objective_kwargs(cfg.dpo))
    if not cfg.dpo.listwise:
        reference = summed_pair_logprobs(host_local(base), model_cfg, held_out.arrays, cfg.eval_batch_size)
        return lambda params: pair_metrics(*summed_pair_logprobs(host_local(params), model_cfg, held_out.arrays,
                                                                 cfg.eval_batch_size), *reference,
                                                                 implicit_reward_beta(cfg.dpo))
    lists = held_out.arrays
    reference = summed_list_logprobs(host_local(base), model_cfg, lists, cfg.eval_batch_size)
    hyper = objective_kwargs(cfg.dpo)
    return lambda params: list_metrics(summed_list_logprobs(host_local(params), model_cfg, lists, cfg.eval_batch_size),
                                       reference, lists["list_scores"], lists["list_valid"], cfg.dpo.objective,
                                       hyper, implicit_reward_beta(cfg.dpo))


def unpaired_evaluation(cfg: DPOFilesConfig, model_cfg: ModelConfig, base, rows: dict, hyper: dict):
    """policy params -> `unpaired_metrics` of the held-out completions (and their mismatched sequences, when the
    rows carry them) against `base`."""

    def summed(params) -> tuple[np.ndarray, ...]:
        local = host_local(params)
        out = (summed_unpaired_logprobs(local, model_cfg, rows, cfg.eval_batch_size),)
        if "kl_tokens" in rows:
            out += (summed_unpaired_logprobs(local, model_cfg, rows, cfg.eval_batch_size, MISMATCHED_KEYS),)
        return out

    reference = summed(base)
    beta = implicit_reward_beta(cfg.dpo)

    def evaluate(params) -> dict[str, float]:
        policy = summed(params)
        kl = {} if len(policy) == 1 else {"kl_policy": policy[1], "kl_reference": reference[1]}
        return unpaired_metrics(policy[0], reference[0], rows["label"], cfg.dpo.objective, hyper, beta, **kl)

    return evaluate


def train_dpo(cfg: DPOFilesConfig, mesh, model_cfg: ModelConfig, base, train: BucketedDataset,
              held_out: BucketedDataset, tokenizer_sha256: str, workdir: str, log: MetricsLog):
    """The preference phase (`jaxalign.train.preference`) from `base` with `base` as reference, evaluated on the
    held-out pairs or lists. Returns (final policy params: adapters merged under LoRA, the trained state's params,
    held-out evaluation history)."""
    evaluate = heldout_evaluation(cfg, model_cfg, base, held_out)

    lora = cfg.lora.config()
    run = RunDir(workdir)
    metadata = {"experiment": "dpo_files", "model": dataclasses.asdict(model_cfg),
                "data": fingerprint(train, step_batch(cfg)[1], cfg.seed),
                **({"lora": dataclasses.asdict(lora)} if lora is not None else {})}
    result = train_preference(
        cfg.dpo, model_cfg=model_cfg, mesh=mesh, init_params=base, data=train, directory=run.checkpoints("dpo"),
        log=log, evaluation=Evaluation(evaluate, eval_keys(cfg), select="eval/loss", maximize=False), seed=cfg.seed,
        checkpoint=cfg.checkpoint, metadata=metadata, cache_dir=cfg.dpo.reference_cache_dir or run.reference_cache,
        tokenization={"tokenizer_sha256": tokenizer_sha256}, lora=cfg.lora, eval_batch_size=cfg.eval_batch_size,
        show_progress=cfg.show_progress, log_every=cfg.log_every)
    return result.selected, result.state_params, result.history


def train_loss_summary(records: list[dict]) -> dict:
    """The training loss at the first and last logged steps (every `log_every` steps) of the metrics log."""
    logged = [r for r in records if "loss" in r]
    if not logged:
        return {}
    return {"train_loss_first_logged": logged[0]["loss"], "train_loss_first_logged_step": logged[0]["step"],
            "train_loss_last": logged[-1]["loss"]}


def _plot(history: list[dict], records: list[dict], path: str, accuracy: str = "eval/reward_accuracy",
          listwise: bool = False, objective: str | None = None) -> None:
    """Held-out loss (with the training loss) and the held-out `accuracy` metric over steps; `objective`: the
    unpaired objective trained on labelled completions (its loss at step 0, policy = reference, is the line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["eval/loss"] for r in history], marker="o", label="held-out")
    train = [r for r in records if "loss" in r]
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.6, label="training")
    if objective is not None:  # its value at policy = reference depends on the objective and its weights
        ax_loss.axhline(history[0]["eval/loss"], color="gray", linestyle=":", label="step 0 (policy = reference)")
    elif not listwise:  # a listwise loss at policy = reference depends on the lists' sizes and ties
        ax_loss.axhline(math.log(2), color="gray", linestyle=":", label="log 2 (policy = reference)")
    name = f"{objective} loss" if objective is not None else "listwise loss" if listwise else "DPO loss"
    ax_loss.set(xlabel="DPO step", ylabel=name, title=name)
    ax_loss.legend()
    label = accuracy.split("/")[1].replace("_", " ")
    ax_acc.plot(steps, [r[accuracy] for r in history], marker="o")
    ax_acc.set(xlabel="DPO step", ylabel=f"{label} (held-out)", ylim=(-0.02, 1.02), title=f"held-out {label}")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)


__all__ = ["DPOFilesConfig", "DataSection", "ExportSection", "FILES_DPO", "ModelSection", "TRAIN_FORMATS",
           "check_objective", "list_metrics", "model_format", "pair_metrics", "run", "split_rows", "take_rows",
           "unpaired_metrics", "unpaired_rows"]
