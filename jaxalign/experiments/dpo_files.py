"""DPO on your own data and model: a Hugging Face (or `jaxalign convert`) checkpoint and a local preference file.

    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=pairs.jsonl [key=value ...]
    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=steps.jsonl data.format=stepwise
    jaxalign run dpo_files --workdir DIR model.path=MODEL_DIR data.path=lists.jsonl data.format=ranked \
        loss=plackett_luce dpo.list_batch_size=16

Three of `jaxalign data prepare`'s formats train here (`data.format`, `jaxalign.data.tokenize` for the layouts):
- pairwise (prompt, chosen, rejected): every pairwise, reference-free or unpaired objective reading the pairs.
- stepwise (prompt, prefix steps, chosen step, rejected step): Step-DPO (Lai et al. 2024, eq. 2) is DPO whose
  prompt is the question plus the earlier correct steps and whose completions are the next step only; the layout is
  the pairwise one, so it trains and is evaluated exactly like pairwise rows with the same objectives.
- ranked (prompt, K completions, K scores): the listwise objectives that read nothing but the lists (adpo,
  plackett_luce, rankdpo), `dpo.list_batch_size` lists per step. A pairwise objective on ranked data is refused
  rather than silently reduced to pairs (which pairs to take is a modelling choice: write them as a pairwise file);
  tpo is refused too, as it needs reasoning-step ids and hidden states that a ranked file does not define.
A mismatch of data.format and loss is one error before the work directory is created.

Pipeline (re-running the same command continues a killed run from its latest checkpoint):
1. Load the model, sharded over the mesh: a Hugging Face directory (config.json + safetensors, `from_pretrained`)
   or a `jaxalign convert hf-to-jaxalign` directory (jaxalign_config.json + params.safetensors, `load_native`).
2. Validate and tokenize the file (`jaxalign.data.pipeline.prepare_dataset`: a TFDS array_record build under
   `data.dataset_dir`, default WORKDIR/data, reused while the file is unchanged) with the tokenizer of
   `model.tokenizer` (default: the model directory). Skipped rows and truncations are counted in results.json.
3. Split off `data.eval_fraction` of the rows (pairs or lists) as held-out rows (a seeded permutation: the same
   split every run).
4. The shared preference phase (`jaxalign.train.preference`) with `dpo.objective` (default sigmoid DPO; any
   registered pairwise, reference-free or unpaired objective whose inputs are the pairs themselves), the loaded
   model being the reference: its log-probs cached on disk ("cached", default), a frozen copy run every step
   ("online") or TR-DPO's periodic sync ("sync"). `lora.rank` > 0 trains adapters only, the loaded model being their
   frozen base and the reference (one copy of the weights). `dpo.select_best=true` returns the step with the lowest
   held-out loss instead of the last one.
5. Every `dpo.eval_every` steps, and at step 0 and the last step, the held-out pairs are scored under the sigmoid
   DPO loss with `dpo.beta` against the loaded model: loss (log 2 at step 0, where policy = reference), reward
   accuracy (share of pairs whose chosen reward exceeds the rejected one; 0 at step 0, where all rewards are 0)
   and mean reward margin. Held-out ranked lists are scored under the trained listwise objective itself (its
   hyper-parameters, the summed log-probs of every valid completion under policy and loaded model): loss, top-1
   accuracy (share of lists with a strict preference whose best-scored completion has the highest implicit reward
   beta * (log pi - log ref), strictly; 0 at step 0), pair accuracy over the strictly ordered pairs and the
   best-minus-worst reward margin; `dpo.select_best` then selects on that held-out listwise loss.
   results.json reports before/after, dpo_heldout.png plots them.
6. With `export.enabled=true`, the trained policy (adapters merged) is written to WORKDIR/export as a Hugging Face
   checkpoint of the source family (`save_pretrained`), with the tokenizer files beside it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import ClassVar

import numpy as np

from jaxalign.algorithms import objective_extras
from jaxalign.data.formats import ON_ERROR
from jaxalign.data.pipeline import SEQUENCE_SUFFIXES, BucketedDataset, fingerprint
from jaxalign.data.tokenize import ON_OVERFLOW, PROMPT_TRUNCATION, TokenizeConfig
from jaxalign.distributed import host_local, is_primary
from jaxalign.losses import ListwiseInputs, get_spec
from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig, check_model_fits_mesh, count_params
from jaxalign.models.lora import count_adapter_params
from jaxalign.rundir import RunDir, claim, config_to_dict, params_sha256, write_json_atomic
from jaxalign.sharding import MeshConfig, check_batch_fits_mesh, make_mesh
from jaxalign.train.checkpoint import CheckpointConfig
from jaxalign.train.loop import MetricsLog
from jaxalign.train.preference import Evaluation, LoraSection, PreferenceConfig, train_preference
from jaxalign.train.step import extra_params_needed

EXPORT_DTYPES = ("float32", "bfloat16")
# Files of a Hugging Face tokenizer copied beside an export, so the exported directory is complete.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EVAL_KEYS = ("eval/loss", "eval/reward_accuracy", "eval/reward_margin", "eval/chosen_reward",
             "eval/rejected_reward")
LIST_EVAL_KEYS = ("eval/loss", "eval/top1_accuracy", "eval/reward_margin", "eval/pair_accuracy")
# The formats that train here; unpaired and trajectory files are validated by `jaxalign data prepare` only.
TRAIN_FORMATS = ("pairwise", "stepwise", "ranked")
LIST_ARRAYS = ("list_tokens", "list_attention_mask", "list_completion_mask")


def file_listwise_objectives() -> list[str]:
    """The registered listwise objectives that read nothing beyond the lists and the reference."""
    from jaxalign.losses import registry

    return sorted(n for n, s in registry.SPECS.items() if s.family == "listwise" and not s.extras)


def check_objective(name: str, format: str = "pairwise") -> None:
    """Refuse an objective whose family does not match `format` (listwise on pairs, pairwise on lists) and objectives
    that need more than the rows and the reference: extras this experiment does not build (KTO's mismatched pairs,
    reward models, judged scores, value heads, TPO's step ids and hidden states). One error naming data.format and
    loss, or what the objective needs."""
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
    if unsupported:
        raise ValueError(f"dpo.objective={name!r} needs {', '.join(unsupported)} "
                         f"beyond the preference pairs, which dpo_files does not build; use arith_dpo for it, or "
                         f"another objective")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """path: a Hugging Face checkpoint directory (config.json + model.safetensors or shards) or a `jaxalign convert
        hf-to-jaxalign` output (jaxalign_config.json + params.safetensors); which one is detected from the files.
    tokenizer: a tokenizer.json or the directory holding it (and its tokenizer_config.json); default: `path`.
    dtype: the compute dtype (parameters stay float32).
    remat: recompute each block's activations in the backward pass (less memory, more compute)."""

    path: str = ""
    tokenizer: str = ""
    dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The preference file and how it becomes token arrays (`jaxalign.data.tokenize`).

    path: a .jsonl or .parquet file in `format`.
    format: the rows' format: "pairwise" (prompt, chosen, rejected), "stepwise" (prompt, prefix, chosen and rejected
        next step: Step-DPO) or "ranked" (prompt, completions, scores: listwise objectives)
    on_error: a malformed row stops the run naming file, line and field ("fail") or is skipped and counted ("skip")
    max_length: tokens of prompt + completion per sequence; longer rows are handled by `on_overflow`
    max_prompt_length: tokens of the prompt at most (None: max_length - 1); a longer prompt is cut
    prompt_truncation: what a cut prompt keeps, "keep_end" (the question is usually last) or "keep_start";
        a cut completion keeps its start
    on_overflow: a row over the limits is truncated and counted ("truncate"), dropped and counted ("drop") or
        refused naming its line ("error")
    eval_fraction: share of the rows (at least one) held out for evaluation, split by a permutation seeded by `seed`
    dataset_dir: where the TFDS build goes (default WORKDIR/data; point it at a `jaxalign data prepare --output`
        directory to reuse that build)."""

    path: str = ""
    format: str = "pairwise"
    on_error: str = "fail"
    max_length: int = 512
    max_prompt_length: int | None = None
    prompt_truncation: str = "keep_end"
    on_overflow: str = "truncate"
    eval_fraction: float = 0.1
    dataset_dir: str = ""

    def __post_init__(self):
        if self.format not in TRAIN_FORMATS:
            raise ValueError(f"data.format must be one of {TRAIN_FORMATS} (the formats dpo_files trains on), got "
                             f"{self.format!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must lie in (0, 1), got {self.eval_fraction!r}")
        for name, allowed in (("prompt_truncation", PROMPT_TRUNCATION), ("on_overflow", ON_OVERFLOW)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.tokenize_config()  # TokenizeConfig's own checks of the lengths

    def tokenize_config(self) -> TokenizeConfig:
        try:
            return TokenizeConfig(max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                                  prompt_truncation=self.prompt_truncation, on_overflow=self.on_overflow)
        except ValueError as e:
            raise ValueError(str(e).replace("TokenizeConfig.", "data.")) from None


# The preference phase for a user's model: the library's defaults (beta 0.1, no chosen-NLL term, AdamW 5e-6), small
# batches, and the last step returned (dpo.select_best=true selects the step with the lowest held-out loss instead).
FILES_DPO = PreferenceConfig(steps=100, batch_size=8, select_best=False)


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """enabled: write the trained policy (LoRA adapters merged) to WORKDIR/export as a Hugging Face checkpoint.
    family: llama|mistral|qwen2|gemma, default the source model's.
    dtype: float32|bfloat16: the dtype of the exported tensors."""

    enabled: bool = False
    family: str = ""
    dtype: str = "float32"

    def __post_init__(self):
        if self.family and self.family not in hf.FAMILIES:
            raise ValueError(f"export.family must be one of {hf.FAMILIES} (or empty: the source's), got "
                             f"{self.family!r}")
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"export.dtype must be one of {EXPORT_DTYPES}, got {self.dtype!r}")


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


def model_format(path: str) -> str:
    """"jaxalign" for a `jaxalign convert` directory, "hf" for a Hugging Face one; else one clear error."""
    if not os.path.isdir(path):
        raise ValueError(f"model.path={path!r} is not a directory; expected a Hugging Face checkpoint directory "
                         f"(config.json + safetensors) or a `jaxalign convert hf-to-jaxalign` output")
    if os.path.isfile(os.path.join(path, hf.NATIVE_CONFIG)):
        return "jaxalign"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"model.path={path!r} holds neither config.json (Hugging Face) nor {hf.NATIVE_CONFIG} "
                     f"(jaxalign convert)")


def split_rows(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of `n` pairs: a permutation seeded by `seed`, the first round(eval_fraction * n)
    (at least 1) held out; both sorted, so the split depends on nothing but (n, eval_fraction, seed)."""
    held = min(max(1, int(round(eval_fraction * n))), n - 1)
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def take_rows(data: BucketedDataset, rows: np.ndarray) -> BucketedDataset:
    """The given rows, with the sequence arrays (time last: [N, L] pairs, [N, K, L] lists) cut to the longest of them
    (no all-padding columns)."""
    width = max(int(np.max(data.lengths[rows])), 2)
    arrays = {k: v[rows][..., :width] if k.endswith(SEQUENCE_SUFFIXES) else v[rows] for k, v in data.arrays.items()}
    return BucketedDataset(arrays, data.lengths[rows])


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


def check_tokens_fit_model(arrays: dict, model_cfg: ModelConfig, tokenizer_path: str) -> None:
    """Every token id must have an embedding row: a tokenizer that does not belong to the model is one error."""
    top = max(int(np.max(v)) for k, v in arrays.items() if k.endswith("tokens"))
    if top >= model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_path} produced token id {top}, but the model's vocabulary has "
                         f"{model_cfg.vocab_size} ids; model.tokenizer must be the model's own tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def load_model(cfg: DPOFilesConfig, mesh) -> tuple[dict, ModelConfig, str | None]:
    """(params sharded over `mesh`, ModelConfig, Hugging Face family or None) from `model.path`."""
    overrides = {"dtype": cfg.model.dtype, "remat": cfg.model.remat}
    if model_format(cfg.model.path) == "jaxalign":
        return hf.load_native(cfg.model.path, mesh=mesh, **overrides)
    _, family = hf.read_hf_config(cfg.model.path)
    params, model_cfg = hf.from_pretrained(cfg.model.path, mesh=mesh, **overrides)
    return params, model_cfg, family


def tokenizer_path(cfg: DPOFilesConfig) -> str:
    return cfg.model.tokenizer or cfg.model.path


def load_tokenizer(cfg: DPOFilesConfig):
    """The run's tokenizer (`model.tokenizer`, else the model directory's), or one clear error."""
    from jaxalign.data.tokenize import load_hf_tokenizer

    source = tokenizer_path(cfg)
    if not os.path.exists(source):
        raise ValueError(f"model.tokenizer={source!r} does not exist")
    try:
        return load_hf_tokenizer(source)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; set model.tokenizer to the model's tokenizer.json or its directory (a `jaxalign "
                         f"convert` output holds no tokenizer)") from None


def row_unit(cfg: DPOFilesConfig) -> str:
    """What one row of the data is, for messages and results keys."""
    return "lists" if cfg.data.format == "ranked" else "pairs"


def step_batch(cfg: DPOFilesConfig) -> tuple[str, int]:
    """(setting, rows per step): listwise objectives take `dpo.list_batch_size` lists, the others pairs."""
    return ("dpo.list_batch_size", cfg.dpo.list_batch_size) if cfg.dpo.listwise else ("dpo.batch_size",
                                                                                      cfg.dpo.batch_size)


def load_pairs(cfg: DPOFilesConfig, workdir: str, model_cfg: ModelConfig, tok):
    """(train rows, held-out rows, data report): the file validated, tokenized with `tok` and split; rows are pairs
    (pairwise, stepwise) or ranked lists."""
    from jaxalign.data.pipeline import prepare_dataset

    source = tokenizer_path(cfg)
    data_dir = cfg.data.dataset_dir or os.path.join(workdir, "data")
    dataset, report = prepare_dataset(cfg.data.format, cfg.data.path, data_dir, tok, cfg.data.tokenize_config(),
                                      on_error=cfg.data.on_error)
    check_tokens_fit_model(dataset.arrays, model_cfg, source)
    unit = row_unit(cfg)
    if len(dataset) < 2:
        raise ValueError(f"{cfg.data.path}: {len(dataset)} usable {unit}; at least 2 are needed (one to train on, "
                         f"one held out)")
    train_rows, eval_rows = split_rows(len(dataset), cfg.data.eval_fraction, cfg.seed)
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
    if not os.path.isfile(cfg.data.path):
        raise ValueError(f"data.path={cfg.data.path!r} does not exist")
    check_objective(cfg.dpo.objective, cfg.data.format)
    setting, batch = step_batch(cfg)
    check_batch_fits_mesh(batch // cfg.dpo.grad_accum_steps, mesh, f"{setting} / grad_accum_steps")


def check_model(cfg: DPOFilesConfig, model_cfg: ModelConfig, family: str | None, mesh) -> str | None:
    """Checks that need the model's config; returns the export family (None when not exporting)."""
    check_model_fits_mesh(model_cfg, mesh)
    if cfg.data.max_length > model_cfg.max_len:
        raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the model's context of {model_cfg.max_len} "
                         f"positions (max_position_embeddings); set data.max_length <= {model_cfg.max_len}")
    if not cfg.export.enabled:
        return None
    export_family = cfg.export.family or family
    if export_family is None:
        raise ValueError(f"{cfg.model.path} records no Hugging Face family; set export.family "
                         f"({', '.join(hf.FAMILIES)})")
    return export_family


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
    os.makedirs(workdir, exist_ok=True)
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
        "rows_read": data_report["validation"]["rows_read"],
        "rows_skipped": data_report["validation"]["rows_skipped"] + data_report["tokenization"]["rows_skipped"],
        "prompts_truncated": data_report["tokenization"]["prompts_truncated"],
        "completions_truncated": data_report["tokenization"]["completions_truncated"],
        "data": data_report,
        "steps": cfg.dpo.steps,
        "num_params": count_params(base),
        "num_trainable_params": count_adapter_params(state_params) if cfg.lora.rank else count_params(base),
        "model_format": model_format(cfg.model.path),
        "family": family,
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(policy),
        "config": config_to_dict(cfg),
    }
    if export_family is not None:
        results["export"] = export_policy(policy, model_cfg, export_family, cfg, workdir, tok)
    if is_primary():
        write_json_atomic(RunDir(workdir).results, results)
        _plot(history, log.records("dpo"), RunDir(workdir).file("dpo_heldout.png"), keys[1],
              listwise=cfg.dpo.listwise)
    return results


def eval_keys(cfg: DPOFilesConfig) -> tuple[str, ...]:
    return LIST_EVAL_KEYS if cfg.dpo.listwise else EVAL_KEYS


def heldout_evaluation(cfg: DPOFilesConfig, model_cfg: ModelConfig, base, held_out: BucketedDataset):
    """policy params -> held-out metrics against `base` (pairs: `pair_metrics`; lists: `list_metrics`)."""
    from jaxalign.train.preference import objective_kwargs

    if not cfg.dpo.listwise:
        reference = summed_pair_logprobs(host_local(base), model_cfg, held_out.arrays, cfg.eval_batch_size)
        return lambda params: pair_metrics(*summed_pair_logprobs(host_local(params), model_cfg, held_out.arrays,
                                                                 cfg.eval_batch_size), *reference, cfg.dpo.beta)
    lists = held_out.arrays
    reference = summed_list_logprobs(host_local(base), model_cfg, lists, cfg.eval_batch_size)
    hyper = objective_kwargs(cfg.dpo)
    return lambda params: list_metrics(summed_list_logprobs(host_local(params), model_cfg, lists, cfg.eval_batch_size),
                                       reference, lists["list_scores"], lists["list_valid"], cfg.dpo.objective,
                                       hyper, cfg.dpo.beta)


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


def export_policy(params, model_cfg: ModelConfig, family: str, cfg: DPOFilesConfig, workdir: str, tok) -> dict:
    """Write `params` to WORKDIR/export as a Hugging Face `family` checkpoint with the tokenizer's special-token ids
    (config.json and generation_config.json: transformers' `generate` stops where ours does), plus the tokenizer
    files."""
    import jax.numpy as jnp

    path = os.path.join(workdir, "export")
    dtype = np.float32 if cfg.export.dtype == "float32" else jnp.bfloat16
    hf.save_pretrained(params, model_cfg, path, family, dtype=dtype,
                       token_ids={"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    source = tokenizer_path(cfg)
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    copied = []
    if is_primary():
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copyfile(os.path.join(directory, name), os.path.join(path, name))
                copied.append(name)
    return {"path": path, "family": family, "dtype": cfg.export.dtype, "tokenizer_files": copied}


def train_loss_summary(records: list[dict]) -> dict:
    """The training loss at the first and last logged steps (every `log_every` steps) of the metrics log."""
    logged = [r for r in records if "loss" in r]
    if not logged:
        return {}
    return {"train_loss_first_logged": logged[0]["loss"], "train_loss_first_logged_step": logged[0]["step"],
            "train_loss_last": logged[-1]["loss"]}


def _plot(history: list[dict], records: list[dict], path: str, accuracy: str = "eval/reward_accuracy",
          listwise: bool = False) -> None:
    """Held-out loss (with the training loss) and the held-out `accuracy` metric over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["eval/loss"] for r in history], marker="o", label="held-out")
    train = [r for r in records if "loss" in r]
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.6, label="training")
    if not listwise:  # a listwise loss at policy = reference depends on the lists' sizes and ties
        ax_loss.axhline(math.log(2), color="gray", linestyle=":", label="log 2 (policy = reference)")
    name = "listwise loss" if listwise else "DPO loss"
    ax_loss.set(xlabel="DPO step", ylabel=name, title=name)
    ax_loss.legend()
    label = accuracy.split("/")[1].replace("_", " ")
    ax_acc.plot(steps, [r[accuracy] for r in history], marker="o")
    ax_acc.set(xlabel="DPO step", ylabel=f"{label} (held-out)", ylim=(-0.02, 1.02), title=f"held-out {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DPOFilesConfig", "DataSection", "ExportSection", "FILES_DPO", "ModelSection", "TRAIN_FORMATS",
           "check_objective", "list_metrics", "model_format", "pair_metrics", "run", "split_rows", "take_rows"]
