"""The main job: SFT on noisy ARITH demonstrations, then DPO on on-policy pairs labelled by the oracle.

Pipeline (each phase resumable; re-running the same command continues where a killed run stopped):
1. SFT on demonstrations that drop most carries (`jaxalign.tasks.arith`), so the greedy SFT policy is
   systematically wrong on the prompts that need a carry.
2. Pairs: sample K completions per training prompt from the SFT policy (KV-cached sampler, temperature, top-k),
   grade them with the oracle, and pair the best- against the worst-scored sample; tied prompts are dropped and
   counted.
3. Preference training with `dpo.objective` (default: the sigmoid loss, Rafailov et al. 2023, eq. 7; any registered
   pairwise, reference-free or unpaired objective, `loss=NAME`) and the SFT policy as reference, `dpo.reference`:
   cached log-probs (default), an online frozen copy, or TR-DPO's periodic sync.
4. Guard against over-optimisation: with a fixed reference DPO keeps pushing rejected likelihoods down, responses
   drift and answers the SFT policy had right start to break. Every `dpo.eval_every` steps the policy is decoded
   greedily on validation prompts (training problems never used for pairs) and checkpointed; the run returns the
   checkpoint with the best validation accuracy (earliest on ties), not the last one. results.json reports both.
5. Greedy exact-match accuracy of both policies on held-out problems (disjoint from all training problems).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import time
from typing import Any, Callable, ClassVar

import jax
import numpy as np

from jaxalign.data.iterator import ArrayDataset, dropped_per_epoch
from jaxalign.distributed import host_local, is_primary
from jaxalign.experiments import objective_extras
from jaxalign.experiments.objective_extras import ExtrasConfig
from jaxalign.losses import get_spec
from jaxalign.losses.dpo import check_beta
from jaxalign.models.heads import VALUE_HEAD, init_value_head
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params
from jaxalign.models.lora import LoraConfig, merge_lora
from jaxalign.sampling import SamplingConfig, generate, generate_extrapolated
from jaxalign.sharding import (
    MeshConfig,
    check_batch_fits_mesh,
    check_model_fits_mesh,
    make_mesh,
)
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    first_json_difference,
    json_normalise,
    show_json_value,
)
from jaxalign.train.loop import MetricsLog, train_loop
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.listwise import cached_list_reference_logprobs, listwise_loss_fn
from jaxalign.train.reference import ReferenceSync, cached_reference_logprobs
from jaxalign.train.setup import sharded_lora_train_state, sharded_train_state
from jaxalign.train.step import (
    dpo_loss_fn,
    initial_objective_state,
    jit_train_step,
    logits_fn,
    lora_loss_fn,
    make_train_step,
    sft_loss_fn,
)

PROMPT_LEN = 8  # "a+b+c+d=" with single digits


def completion_len(task: arith.ArithConfig) -> int:
    """Completion slots a task needs: its longest demonstration (`arith.max_completion_chars`) + EOS + one slot of
    slack (so a policy that runs on past the longest answer is seen doing so rather than cut off exactly there)."""
    return arith.max_completion_chars(task) + 2


def completion_budget(model_cfg: ModelConfig) -> int:
    """How many tokens sampling may generate: the model's context after the prompt."""
    return model_cfg.max_len - PROMPT_LEN


COMPLETION_LEN = completion_len(arith.ArithConfig())  # 24: "9+9=18;18+9=27;27+9=36" (22 chars) + EOS + slack


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 600
    batch_size: int = 64
    grad_accum_steps: int = 1
    optim: OptimConfig = OptimConfig(learning_rate=2e-3, warmup_steps=100)


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """On-policy pair construction: `samples_per_prompt` samples for each of `num_prompts` training prompts.

    Two knobs make the judge imperfect on purpose (the built-in length-bias and noisy-label tasks):
    length_bonus: the judge ranks samples by oracle score + length_bonus * (completion tokens), so longer responses
        win more often than their quality warrants;
    label_flip_rate: each kept pair's chosen and rejected are swapped with this probability (seeded; the number of
        flipped pairs is reported), the label-noise model of cDPO / robust DPO.
    """

    num_prompts: int = 2048
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_k: int = 0
    min_score_gap: float = 0.5
    require_correct_chosen: bool = True
    length_bonus: float = 0.0
    label_flip_rate: float = 0.0

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"pairs.samples_per_prompt must be >= 2 to form a pair, got {self.samples_per_prompt!r}")
        if not 0.0 <= self.label_flip_rate < 0.5:
            raise ValueError(f"pairs.label_flip_rate must lie in [0, 0.5), got {self.label_flip_rate!r}")
        if not self.length_bonus >= 0.0:
            raise ValueError(f"pairs.length_bonus must be >= 0, got {self.length_bonus!r}")


REFERENCE_MODES = ("online", "cached", "sync")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference training from the SFT policy. beta is large for a tiny model (the usual 0.1 over-optimises within a
    few dozen steps here), and sft_weight adds the chosen-NLL regulariser; see the README's measurements.

    objective: any registered objective (`jaxalign objectives`); `loss=NAME` on the command line is short for
        `dpo.objective=NAME`. Listwise objectives train on ranked lists of all K graded samples of a prompt,
        `list_batch_size` lists per step (16 lists of 8 = the sequences of 64 pairs: the same tokens per step).
        beta is passed to every objective that takes one (or its equivalent, `BETA_EQUIVALENTS`), label_smoothing
        only when set; `objective_args` sets any other hyper-parameter or TRL's loss modifiers, e.g. "tau=0.1" or
        "ld_alpha=0.5,wpo=true,f_divergence=js_divergence".
    reference: "online" (a frozen copy of the SFT policy runs a forward pass every step), "cached" (its log-probs are
        computed once and cached on disk under a content hash in `reference_cache_dir`, default
        WORKDIR/reference_cache, with the other precomputed objective extras)
        or "sync" (TR-DPO: every `sync_every` steps ref <- sync_alpha * policy + (1 - sync_alpha) * ref).
    """

    steps: int = 150
    batch_size: int = 64
    list_batch_size: int = 16
    grad_accum_steps: int = 1
    beta: float = 2.0
    label_smoothing: float | None = None
    objective: str = "sigmoid"
    objective_args: str = ""
    sft_weight: float = 1.0
    optim: OptimConfig = OptimConfig(learning_rate=5e-5, warmup_steps=20)
    eval_every: int = 25
    select_best: bool = True
    reference: str = "cached"
    reference_cache_dir: str = ""
    sync_every: int = 50
    sync_alpha: float = 0.6

    def __post_init__(self):
        check_beta(self.beta)
        if self.eval_every <= 0:
            raise ValueError(f"dpo.eval_every must be positive, got {self.eval_every!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.reference == "sync":
            ReferenceSync(self.sync_every, self.sync_alpha)  # validates both
        objective_kwargs(self)  # validates the objective name and its arguments now, not after SFT

    @property
    def reference_sync(self) -> ReferenceSync | None:
        return ReferenceSync(self.sync_every, self.sync_alpha) if self.reference == "sync" else None


def _parse_scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


# Objectives whose KL-strength parameter is not called beta: dpo.beta is passed under these names (ADPO's
# temperature is 1/beta: its K=2 case is cDPO with beta = 1/tau; DRO's tau multiplies the log-ratio as beta does).
BETA_EQUIVALENTS: dict[str, dict[str, Any]] = {
    "adpo": {"tau": lambda beta: 1.0 / beta},
    "dro": {"tau": lambda beta: beta},
    "flex_dpo": {"beta_chosen": lambda beta: beta, "beta_rejected": lambda beta: beta},
}


def objective_kwargs(dpo: DPOConfig) -> dict[str, Any]:
    """The hyper-parameters passed to `dpo.objective`: beta when it takes one (or its equivalent,
    `BETA_EQUIVALENTS`), label_smoothing when set, and `objective_args` ("name=value,name=value"), which win.
    Unknown names are one clear error listing the accepted ones."""
    spec = get_spec(dpo.objective)
    accepted = {name for name, p in inspect.signature(spec.fn).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"inputs", "pair_weights"}
    # TRL's loss modifiers (f_divergence, f_alpha, ld_alpha, wpo); compute_objective rejects the ones an objective
    # does not support with its own clear error.
    accepted |= {"f_divergence", "f_alpha", "ld_alpha", "wpo"} if spec.modifiers else set()
    kwargs: dict[str, Any] = {}
    if "beta" in accepted:
        kwargs["beta"] = dpo.beta
    for name, from_beta in BETA_EQUIVALENTS.get(spec.name, {}).items():
        kwargs[name] = from_beta(dpo.beta)
    if dpo.label_smoothing is not None:
        kwargs["label_smoothing"] = dpo.label_smoothing
    for item in filter(None, (part.strip() for part in dpo.objective_args.split(","))):
        if "=" not in item:
            raise ValueError(f"dpo.objective_args: {item!r} is not of the form name=value")
        name, value = (part.strip() for part in item.split("=", 1))
        kwargs[name] = _parse_scalar(value)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"dpo.objective={dpo.objective!r} takes no {', '.join(unknown)}; it accepts: "
                         f"{', '.join(sorted(accepted)) or 'nothing'}")
    return kwargs


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA for the preference phase (Hu et al. 2021, `jaxalign.models.lora`). rank 0 (the default) trains every
    parameter; rank > 0 trains adapters on the kernels `targets` selects (comma-separated path patterns) and nothing
    else, the SFT policy being both their frozen base and the reference (one copy of its weights). The phase
    returns, evaluates and checkpoints-for-selection the merged policy W0 + (alpha / rank) A B."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = "attn/q,attn/v"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be a non-negative integer (0 = no LoRA), got {self.rank!r}")
        self.config()  # LoraConfig's own checks of alpha and the patterns

    def config(self) -> LoraConfig | None:
        if not self.rank:
            return None
        targets = tuple(part.strip() for part in self.targets.split(",") if part.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=targets)


@dataclasses.dataclass(frozen=True)
class ArithDPOConfig:
    """Everything the main job needs; every field can be overridden from the command line (key=value)."""

    seed: int = 0
    task: arith.ArithConfig = arith.ArithConfig()
    model: ModelConfig = ModelConfig(vocab_size=16, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                                     mlp_dim=344, max_len=PROMPT_LEN + COMPLETION_LEN)
    mesh: MeshConfig = MeshConfig()
    sft: SFTConfig = SFTConfig()
    pairs: PairConfig = PairConfig()
    dpo: DPOConfig = DPOConfig()
    extras: ExtrasConfig = ExtrasConfig()
    lora: LoraSection = LoraSection()
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=100, keep_last=2)
    eval_fraction: float = 0.2
    num_val_prompts: int = 256
    eval_batch_size: int = 1024
    show_progress: bool = True
    log_every: int = 10  # metrics.jsonl gets a record every this many steps (and at every validation step)

    # `jaxalign run arith_dpo loss=NAME` is short for dpo.objective=NAME.
    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"loss": "dpo.objective"}


# The built-in task variants (issue 3's benchmark tasks): each is the main job with these changes, per config section.
# Verbose demonstrations end with 0-3 recaps of the answer (";24"), which the oracle ignores, so length and
# correctness are independent; the model gets room for them.
_VERBOSE_TASK = arith.ArithConfig(max_recaps=3, recap_prob=0.4)
_VERBOSE = {"task": {"max_recaps": _VERBOSE_TASK.max_recaps, "recap_prob": _VERBOSE_TASK.recap_prob},
            "model": {"max_len": PROMPT_LEN + completion_len(_VERBOSE_TASK)}}
TASK_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "arith": {},
    # the length-bias task's control: the same verbose demonstrations, judged by the oracle alone
    "verbose": _VERBOSE,
    # ... judged with 0.5 score per completion token: one recap (3 tokens) outweighs a correct step, and two outweigh
    # most of the gap between a right and a wrong answer
    "length_bias": {**_VERBOSE, "pairs": {"length_bonus": 0.5}},
    # 30% of the pairs flipped, the label-noise model cDPO and robust DPO are built for
    "noisy_labels": {"pairs": {"label_flip_rate": 0.3}},
}


def task_config(cfg: "ArithDPOConfig", task: str) -> "ArithDPOConfig":
    """`cfg` turned into one of the TASK_VARIANTS."""
    if task not in TASK_VARIANTS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASK_VARIANTS)}")
    changes = {section: dataclasses.replace(getattr(cfg, section), **fields)
               for section, fields in TASK_VARIANTS[task].items()}
    return dataclasses.replace(cfg, **changes)


def sft_variant(task: str) -> str:
    """The part of a task variant that changes the SFT phase (its demonstrations or model), as a short stable name;
    '' for variants that share the main job's SFT policy. Variants with the same name can share one SFT policy."""
    changes = {section: TASK_VARIANTS[task][section] for section in ("task", "model") if section in TASK_VARIANTS[task]}
    if not changes:
        return ""
    return "sft_" + hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers.


def params_sha256(params) -> str:
    """A hash of the parameters' bytes (leaves in tree order), to compare runs bit for bit."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(host_local(params))):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def write_json_atomic(path: str, payload: Any) -> None:
    """Write to a temporary file and rename, so readers never see a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Fields that change how a run reports, not what it computes: they may differ when a run is resumed (at any depth,
# so configs that embed this one, e.g. Curry-DPO's `base`, resume alike).
_PRESENTATION_FIELDS = ("show_progress", "eval_batch_size", "log_every")


def without_presentation_fields(config: Any) -> Any:
    """A JSON config without its presentation fields, at every level."""
    if isinstance(config, dict):
        return {k: without_presentation_fields(v) for k, v in config.items() if k not in _PRESENTATION_FIELDS}
    return config


def claim_workdir(cfg, workdir: str) -> None:
    """Write workdir/config.json, or check that a resumed run uses the same config as the run that started it.

    Every phase's cached output (checkpoints, pairs) was produced under that config; resuming with another one
    would silently mix two runs, so a difference is one clear error naming the first differing field.
    """
    path = os.path.join(workdir, "config.json")
    current = json_normalise(config_to_dict(cfg))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        difference = first_json_difference(without_presentation_fields(saved), without_presentation_fields(current))
        if difference:
            field, before, now = difference
            raise ValueError(
                f"{path} records a run with {field.replace('/', '.')}={show_json_value(before)}, but this run has "
                f"{show_json_value(now)}; resume with the same overrides or use a new --workdir"
            )
    write_json_atomic(path, current)


@dataclasses.dataclass(frozen=True)
class Problems:
    """Disjoint problem sets: SFT/pair training, validation (for DPO checkpoint selection) and held-out test."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split(cfg: ArithDPOConfig) -> Problems:
    train, test = arith.split_problems(cfg.task.num_operands, cfg.eval_fraction, cfg.seed)
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(train))
    validation = train[order[: cfg.num_val_prompts]]
    return Problems(train=train[order[cfg.num_val_prompts :]], validation=validation, test=test)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and sampling.


def sample_completions(params, model_cfg: ModelConfig, problems: np.ndarray, sampling: SamplingConfig, rng,
                       batch_size: int, previous_params=None,
                       alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt tokens [N, P], completion tokens [N, C], completion masks [N, C]) for every problem, in order.

    With `previous_params`, tokens are drawn from APO's token-level extrapolation of the two policies
    (`jaxalign.sampling.generate_extrapolated`, momentum `alpha`).
    In a multi-process run every process samples all problems itself, identically, from a local copy of the
    parameters (`host_local`): the decode loop then needs no collectives and every process gets the same result."""
    params = host_local(params)
    if previous_params is None:
        decode = functools.partial(generate, params)
    else:
        decode = functools.partial(generate_extrapolated, params, host_local(previous_params), alpha)
    tok = CharTokenizer()
    prompts = [arith.prompt_text(p) for p in problems]
    prompt_tokens, prompt_mask = arith.encode_prompts(tok, prompts, pad_to=PROMPT_LEN)
    out_tokens, out_masks = [], []
    for start in range(0, len(problems), batch_size):
        rng, sub = jax.random.split(rng)
        tokens, mask = decode(
            prompt_tokens[start : start + batch_size], prompt_mask[start : start + batch_size], sub,
            cfg=model_cfg, sampling=sampling, eos_id=tok.EOS_ID, pad_id=tok.PAD_ID, num_tokens=tok.vocab_size,
        )
        out_tokens.append(np.asarray(tokens))
        out_masks.append(np.asarray(mask))
    return prompt_tokens, np.concatenate(out_tokens), np.concatenate(out_masks)


def grade_completions(problems: np.ndarray, completion_tokens: np.ndarray) -> list[arith.Grade]:
    tok = CharTokenizer()
    return [arith.grade(p, tok.decode(t)) for p, t in zip(problems, completion_tokens)]


def greedy_eval(params, model_cfg: ModelConfig, problems: np.ndarray, batch_size: int):
    """Greedy exact-match accuracy, per-problem correctness and mean completion length (tokens incl. EOS)."""
    greedy = SamplingConfig(max_new_tokens=completion_budget(model_cfg), temperature=0.0)
    _, tokens, mask = sample_completions(params, model_cfg, problems, greedy, jax.random.key(0), batch_size)
    correct = np.array([g.correct for g in grade_completions(problems, tokens)])
    return {"accuracy": float(correct.mean()), "mean_length": float(mask.sum(-1).mean())}, correct


def load_json(path: str) -> dict | None:
    """The JSON object at `path`, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cached_greedy_eval(params, cfg: ArithDPOConfig, problems: np.ndarray, path: str, extra: dict,
                       split_name: str = "test") -> dict:
    """`extra` plus <split_name>_accuracy, <split_name>_mean_length and params_sha256 of a greedy evaluation of
    `params` on `problems`, written to `path`; read back instead when `path` holds the record of the same parameters
    (a resumed multi-phase run does not evaluate finished phases again)."""
    sha = params_sha256(params)
    saved = load_json(path)
    if saved is not None and saved.get("params_sha256") == sha:
        return saved
    evaluation, _ = greedy_eval(params, cfg.model, problems, cfg.eval_batch_size)
    record = dict(extra, params_sha256=sha, **{f"{split_name}_accuracy": evaluation["accuracy"],
                                                f"{split_name}_mean_length": evaluation["mean_length"]})
    write_json_atomic(path, record)
    return record


def drift_from_reference(params, reference, model_cfg: ModelConfig, problems: np.ndarray, pairs: ArrayDataset,
                         batch_size: int, num_samples: int = 512, seed: int = 0) -> dict[str, float]:
    """How far a policy moved from its reference (the objectives benchmark's columns).

    kl_to_ref: Monte-Carlo KL(pi || ref) per response = mean over completions y ~ pi(.|x) (temperature 1, first
        `num_samples` of `problems`) of L_pi(y) - L_ref(y);
    chosen_logp_change / rejected_logp_change: mean L_pi(y) - L_ref(y) over the first `num_samples` training pairs'
        chosen and rejected completions (DPO's implicit rewards divided by beta).
    """
    sampling = SamplingConfig(max_new_tokens=completion_budget(model_cfg), temperature=1.0)
    prompts, completions, masks = sample_completions(params, model_cfg, problems[:num_samples], sampling,
                                                     jax.random.key(seed), batch_size)
    tokens = np.concatenate([prompts, completions], axis=1)
    attention = np.concatenate([prompts != CharTokenizer.PAD_ID, masks], axis=1).astype(np.int32)
    completion = np.concatenate([np.zeros_like(prompts), masks], axis=1).astype(np.int32)

    def log_ratio(*arrays):  # L_pi(y) - L_ref(y) per row
        return (objective_extras.summed_logprobs(params, model_cfg, *arrays, batch_size)
                - objective_extras.summed_logprobs(reference, model_cfg, *arrays, batch_size))

    report = {"kl_to_ref": float(log_ratio(tokens, attention, completion).mean())}
    for side in ("chosen", "rejected"):
        arrays = [pairs.arrays[f"{side}_{k}"][:num_samples] for k in ("tokens", "attention_mask", "completion_mask")]
        report[f"{side}_logp_change"] = float(log_ratio(*arrays).mean())
    return report


# ---------------------------------------------------------------------------------------------------------------
# Datasets.


def sft_dataset(cfg: ArithDPOConfig, problems: np.ndarray) -> ArrayDataset:
    rng = np.random.default_rng([cfg.seed, 2])
    examples = arith.make_sft_examples(problems, rng, cfg.task.carry_drop_prob, cfg.task.max_recaps,
                                       cfg.task.recap_prob)
    batch = arith.encode_batch(CharTokenizer(), [p for p, _ in examples], [c for _, c in examples],
                               max_len=cfg.model.max_len)
    return ArrayDataset(batch)


def build_pairs(problems, prompt_tokens, completions, masks, samples_per_prompt: int, min_score_gap: float,
                require_correct_chosen: bool, length_bonus: float = 0.0, label_flip_rate: float = 0.0, seed: int = 0):
    """Pair, for every prompt, its best-judged sample (chosen) with its worst-judged one (rejected).

    `completions`/`masks` are [N * K, C] with the K samples of prompt i at rows i*K .. i*K+K-1. The judge's score is
    the oracle's `arith.score` plus `length_bonus` per completion token. Prompts whose best and worst judged scores
    differ by less than `min_score_gap` (or, with `require_correct_chosen`, without any exactly correct sample) give
    no pair; both counts are reported. Then each pair is flipped with probability `label_flip_rate` (counted).
    """
    k = samples_per_prompt
    grades = grade_completions(np.repeat(problems, k, axis=0), completions)
    lengths = masks.sum(axis=1).reshape(-1, k)
    scores = np.array([arith.score(g) for g in grades]).reshape(-1, k) + length_bonus * lengths
    best, worst = scores.argmax(axis=1), scores.argmin(axis=1)
    tied = scores.max(axis=1) - scores.min(axis=1) < min_score_gap
    correct = np.array([g.correct for g in grades]).reshape(-1, k)
    no_correct = ~correct.any(axis=1) if require_correct_chosen else np.zeros(len(scores), bool)
    keep = ~tied & ~no_correct
    rows = np.nonzero(keep)[0]
    flipped = np.random.default_rng([seed, 4]).random(len(rows)) < label_flip_rate
    best, worst = best.copy(), worst.copy()
    best[rows[flipped]], worst[rows[flipped]] = worst[rows[flipped]], best[rows[flipped]]
    pick = lambda which: rows * k + which[rows]  # noqa: E731
    prompt_part = prompt_tokens[rows]
    prompt_mask, zeros = prompt_part != CharTokenizer.PAD_ID, np.zeros_like(prompt_part)
    arrays = {}
    for side, idx in (("chosen", pick(best)), ("rejected", pick(worst))):
        arrays[f"{side}_score"] = scores.ravel()[idx].astype(np.float32)  # the judge's score: DRO's reward
        arrays[f"{side}_tokens"] = np.concatenate([prompt_part, completions[idx]], axis=1).astype(np.int32)
        arrays[f"{side}_attention_mask"] = np.concatenate([prompt_mask, masks[idx]], axis=1).astype(np.int32)
        arrays[f"{side}_completion_mask"] = np.concatenate([zeros, masks[idx]], axis=1).astype(np.int32)
    stats = {
        "pairs": int(len(rows)),
        "pairs_dropped_tied": int(tied.sum()),
        "pairs_dropped_no_correct_sample": int((no_correct & ~tied).sum()),
        "pairs_label_flipped": int(flipped.sum()),
        "pairs_chosen_correct_rate": float(np.mean([grades[i].correct for i in pick(best)])) if len(rows) else 0.0,
        "pairs_chosen_longer_rate": float(np.mean(lengths.ravel()[pick(best)] > lengths.ravel()[pick(worst)]))
        if len(rows) else 0.0,
        "samples_correct_rate": float(np.mean([g.correct for g in grades])),
    }
    return ArrayDataset(arrays), stats


def load_dataset(path: str) -> tuple[ArrayDataset, dict] | None:
    """(dataset, stats) from an .npz written by `save_dataset`, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return ArrayDataset({k: f[k] for k in f.files if k != "stats"}), json.loads(str(f["stats"]))


def save_dataset(path: str, dataset: ArrayDataset, stats: dict) -> None:
    """Atomically (temporary file + rename) store a dataset and its statistics."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # per process: processes sharing a workdir may save the same file
    np.savez(tmp, stats=json.dumps(stats), **dataset.arrays)
    os.replace(tmp, path)


def on_policy_samples(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str | None = None):
    """`cfg.pairs.samples_per_prompt` samples from the SFT policy for each of `cfg.pairs.num_prompts` prompts drawn
    from `problems`: (prompt problems [N, ops], prompt tokens [N, P], completions [N*K, C], masks [N*K, C]). Pairs
    and ranked lists are both built from these; with a `workdir` they are cached in workdir/samples.npz."""
    path = workdir and os.path.join(workdir, "samples.npz")
    cached = load_dataset(path) if path else None
    if cached is not None:
        a = cached[0].arrays
        width = a["completions"].shape[-1]
        return a["problems"], a["prompt_tokens"], a["completions"].reshape(-1, width), a["masks"].reshape(-1, width)
    chosen = problems[np.random.default_rng([cfg.seed, 3]).permutation(len(problems))[: cfg.pairs.num_prompts]]
    k = cfg.pairs.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=completion_budget(cfg.model), temperature=cfg.pairs.temperature,
                              top_k=cfg.pairs.top_k)
    prompt_tokens, completions, masks = sample_completions(params, cfg.model, np.repeat(chosen, k, axis=0), sampling,
                                                           jax.random.key(cfg.seed + 17), cfg.eval_batch_size)
    if path:
        save_dataset(path, ArrayDataset({"problems": chosen, "prompt_tokens": prompt_tokens[::k],
                                         "completions": completions.reshape(len(chosen), k, -1),
                                         "masks": masks.reshape(len(chosen), k, -1)}), {})
    return chosen, prompt_tokens[::k], completions, masks


def on_policy_pairs(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str):
    """Sample, grade and pair; cached in workdir/pairs.npz so a resumed run reuses exactly the same pairs."""
    path = os.path.join(workdir, "pairs.npz")
    cached = load_dataset(path)
    if cached is not None:
        return cached
    chosen, prompt_tokens, completions, masks = on_policy_samples(cfg, params, problems, workdir)
    p = cfg.pairs
    dataset, stats = build_pairs(chosen, prompt_tokens, completions, masks, p.samples_per_prompt, p.min_score_gap,
                                  p.require_correct_chosen, p.length_bonus, p.label_flip_rate, cfg.seed)
    if stats["pairs"] < cfg.dpo.batch_size:
        raise ValueError(
            f"only {stats['pairs']} preference pairs survived pairs.min_score_gap={p.min_score_gap} "
            f"({stats['pairs_dropped_tied']} prompts tied, {stats['pairs_dropped_no_correct_sample']} without a "
            f"correct sample), fewer than dpo.batch_size={cfg.dpo.batch_size}"
        )
    save_dataset(path, dataset, stats)
    return dataset, stats


# ---------------------------------------------------------------------------------------------------------------
# Training phases.


def train_sft(cfg: ArithDPOConfig, mesh, problems: Problems, workdir: str, log: MetricsLog):
    """Phase 1: returns the SFT parameters (restored from the final checkpoint when the phase already finished)."""
    return train_supervised(cfg, cfg.sft, mesh, sft_dataset(cfg, problems.train), workdir, log)


def train_supervised(cfg: ArithDPOConfig, sft: SFTConfig, mesh, dataset: ArrayDataset, workdir: str, log: MetricsLog,
                     params=None, phase: str = "sft"):
    """Token-level NLL on `dataset` (tokens, attention_mask, completion_mask) with `sft`'s steps, batch and optimizer,
    from fresh parameters or from `params` (e.g. rejection-sampling fine-tuning of a policy on its own correct
    samples), checkpointed in workdir/checkpoints/<phase> and resumed from there. Returns (params, shardings)."""
    model = DecoderLM(cfg.model)
    tx = make_optimizer(sft.optim, sft.steps)
    state, shardings = sharded_train_state(cfg.model, tx, mesh, jax.random.key(cfg.seed), params=params)
    with Checkpointer(os.path.join(workdir, "checkpoints", phase), cfg.checkpoint,
                      metadata={"phase": phase, "model": dataclasses.asdict(cfg.model)}) as ckpt:
        state = ckpt.restore_latest(state) or state
        step_fn = jit_train_step(make_train_step(sft_loss_fn(model), sft.grad_accum_steps), mesh, shardings, None)
        state = train_loop(
            state=state, step_fn=step_fn, frozen=None, dataset=dataset, batch_size=sft.batch_size,
            num_steps=sft.steps, seed=cfg.seed, mesh=mesh, checkpointer=ckpt, metrics_log=log, desc=phase,
            token_keys=("attention_mask",), show_progress=cfg.show_progress, log_every=cfg.log_every,
        )
    return state.params, shardings.params


@dataclasses.dataclass(frozen=True)
class CustomLoss:
    """A loss the preference phase trains instead of `dpo.objective` (the iterative algorithms' objectives that are
    not registered: TRPA, BRAIn, DDO, ...), with everything else of `train_dpo` unchanged (optimizer, checkpoints,
    validation guard, resume).

    loss_fn: `jaxalign.train.step` signature, (params, frozen, batch) -> (sum of per-item losses, (items, metrics)).
    batch_size: items per step (rows of `data`). token_keys: attention-mask keys counted for tokens/s.
    frozen: frozen parameters passed to every step (None: everything frozen is precomputed in the batch)."""

    loss_fn: Callable
    batch_size: int
    token_keys: tuple[str, ...]
    frozen: Any = None


def train_dpo(cfg: ArithDPOConfig, mesh, sft_params, param_shardings, data: ArrayDataset, problems: Problems,
              workdir: str, log: MetricsLog, custom: CustomLoss | None = None):
    """Phases 3 and 4: preference training (`dpo.objective`) from the SFT policy with it as reference, on pairs
    (`on_policy_pairs`) or, for a listwise objective, ranked lists (`ranked_lists.on_policy_lists`); with `custom`,
    its loss on `data` as given (no objective extras, no reference added; LoRA and dpo.reference=sync refused).

    Checkpoints are written at every validation step (`dpo.eval_every`), so the guard can restore any of them.
    Returns (selected params, last-step params, guard record).
    """
    if custom is not None and (cfg.lora.rank or cfg.dpo.reference == "sync"):
        raise ValueError("a custom loss trains full parameters against a precomputed or frozen reference: set "
                         "lora.rank=0 and dpo.reference to online or cached")
    model = DecoderLM(cfg.model)
    tx = make_optimizer(cfg.dpo.optim, cfg.dpo.steps)
    lora = cfg.lora.config()
    if lora is None:
        state, shardings = sharded_train_state(cfg.model, tx, mesh, jax.random.key(cfg.seed + 1), params=sft_params,
                                               track_reference=cfg.dpo.reference == "sync",
                                               objective_state=initial_objective_state(cfg.dpo.objective),
                                               extra_params=objective_params(cfg))
    else:
        if cfg.dpo.reference == "sync" or objective_params(cfg):
            raise ValueError(f"lora.rank={cfg.lora.rank}: LoRA keeps the SFT policy as the frozen base and reference; "
                             f"it cannot train with dpo.reference=sync or an objective with a value head (dro)")
        state, shardings, _ = sharded_lora_train_state(cfg.model, lora, tx, mesh, jax.random.key(cfg.seed + 1),
                                                       objective_state=initial_objective_state(cfg.dpo.objective))

    def policy(params):
        """The policy's plain parameters: the adapters merged into the SFT policy under LoRA."""
        return params if lora is None else merge_lora(sft_params, params, lora)

    listwise = get_spec(cfg.dpo.objective).family == "listwise"
    if custom is not None:
        frozen = custom.frozen
    else:
        if not listwise:
            data = with_objective_extras(cfg, mesh, sft_params, param_shardings, data, problems, workdir)
        frozen, data = reference_for(cfg, model, sft_params, data, workdir)
    if lora is not None:
        frozen = sft_params  # the adapters' frozen base, and the reference unless its log-probs are cached
    directory = os.path.join(workdir, "checkpoints", "dpo")
    keep = cfg.dpo.steps // cfg.dpo.eval_every + 1
    ckpt_cfg = dataclasses.replace(cfg.checkpoint, every_steps=cfg.dpo.eval_every, keep_last=max(keep, 1))
    metadata = {"phase": "dpo", "model": dataclasses.asdict(cfg.model),
                **({"lora": dataclasses.asdict(lora)} if lora is not None else {})}
    with Checkpointer(directory, ckpt_cfg, metadata=metadata) as ckpt:
        state = ckpt.restore_latest(state) or state
        log.truncate("dpo", int(state.step))
        history = [_val_record(r) for r in log.records("dpo") if "val/accuracy" in r]
        if not history:  # step 0 is the SFT policy itself: selection may keep it if DPO never helps
            sft_val, _ = greedy_eval(sft_params, cfg.model, problems.validation, cfg.eval_batch_size)
            record = {"step": 0, "val/accuracy": sft_val["accuracy"], "val/mean_length": sft_val["mean_length"]}
            log.write(dict(record, phase="dpo"))
            history.append(record)

        def validate(state, metrics):
            step = int(state.step)
            if step % cfg.dpo.eval_every and step != cfg.dpo.steps:
                return None
            val, _ = greedy_eval(policy(state.params), cfg.model, problems.validation, cfg.eval_batch_size)
            history.append({"step": step, "val/accuracy": val["accuracy"], "val/mean_length": val["mean_length"]})
            return {"val/accuracy": val["accuracy"], "val/mean_length": val["mean_length"]}

        if custom is not None:
            loss, batch_size, token_keys = custom.loss_fn, custom.batch_size, custom.token_keys
        elif listwise:
            loss = listwise_loss_fn(model, cfg.dpo.objective, sft_weight=cfg.dpo.sft_weight,
                                    separator_id=CharTokenizer().encode(";")[0], **objective_kwargs(cfg.dpo))
            batch_size, token_keys = cfg.dpo.list_batch_size, ("list_attention_mask",)
        else:
            loss = dpo_loss_fn(model, cfg.dpo.objective, sft_weight=cfg.dpo.sft_weight, **objective_kwargs(cfg.dpo))
            batch_size, token_keys = cfg.dpo.batch_size, ("chosen_attention_mask", "rejected_attention_mask")
        if lora is not None:
            loss = lora_loss_fn(loss, lora)
        step = make_train_step(loss, cfg.dpo.grad_accum_steps, reference_sync=cfg.dpo.reference_sync)
        step_fn = jit_train_step(step, mesh, shardings, None if frozen is None else param_shardings)
        state = train_loop(
            state=state, step_fn=step_fn, frozen=frozen, dataset=data, batch_size=batch_size,
            num_steps=cfg.dpo.steps, seed=cfg.seed + 1, mesh=mesh, checkpointer=ckpt, metrics_log=log, desc="dpo",
            log_every=cfg.log_every,
            hooks=(validate,), token_keys=token_keys,
            show_progress=cfg.show_progress,
        )
        best = select_checkpoint(history)
        guard = {"selected_step": best["step"], "selected_val_accuracy": best["val/accuracy"],
                 "last_step": cfg.dpo.steps, "last_val_accuracy": history[-1]["val/accuracy"],
                 "validation_history": history}
        last = policy(state.params)
        if not cfg.dpo.select_best or best["step"] == cfg.dpo.steps:
            return last, last, guard
        if best["step"] == 0:
            return sft_params, last, guard
        return policy(ckpt.restore(best["step"], state).params), last, guard


def objective_params(cfg: ArithDPOConfig) -> dict | None:
    """Parameters an objective trains beside the policy: DRO's value head V(x) (`jaxalign.models.heads`)."""
    return {VALUE_HEAD: init_value_head(cfg.model)} if "value" in get_spec(cfg.dpo.objective).extras else None


def cache_dir(cfg: ArithDPOConfig, workdir: str) -> str:
    return cfg.dpo.reference_cache_dir or os.path.join(workdir, "reference_cache")


def with_objective_extras(cfg: ArithDPOConfig, mesh, sft_params, param_shardings, pairs: ArrayDataset,
                          problems: Problems, workdir: str) -> ArrayDataset:
    """The pairs plus whatever `dpo.objective` reads beyond log-probs (`objective_extras`), each product cached on
    disk under a content hash so that runs sharing the SFT policy and pairs build it once."""
    spec = get_spec(cfg.dpo.objective)
    wanted = objective_extras.needed(spec)
    if "reward" in spec.extras and "chosen_score" not in pairs.arrays:
        raise ValueError(f"dpo.objective={spec.name!r} needs the judged score of every completion, which this "
                         f"workdir's pairs.npz (written by an older version) lacks; use a new --workdir")
    arrays, cache = dict(pairs.arrays), cache_dir(cfg, workdir)
    batch = cfg.eval_batch_size
    if "mismatched" in wanted:
        arrays.update(objective_extras.mismatched_sequences(arrays, PROMPT_LEN))
        if cfg.dpo.reference == "cached":
            arrays["kl_reference"] = objective_extras.summed_logprobs(
                sft_params, cfg.model, arrays["kl_tokens"], arrays["kl_attention_mask"], arrays["kl_completion_mask"],
                batch)
    if "reward_model" in wanted:
        extras, _ = objective_extras.cached_extras(
            "reward_model", cache, sft_params, arrays, {"config": dataclasses.asdict(cfg.extras), "seed": cfg.seed},
            lambda: objective_extras.reward_model_extras(cfg.extras, cfg.model, sft_params, pairs.arrays, cfg.seed,
                                                         batch, cfg.show_progress))
        arrays.update(extras)
    if "semantic_distance" in wanted:
        extras, _ = objective_extras.cached_extras(
            "semantic_distance", cache, sft_params, arrays, {},
            lambda: objective_extras.semantic_distance_extras(cfg.model, sft_params, pairs.arrays, batch))
        arrays.update(extras)
    if "guidance" in wanted:
        guide_cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(
            cfg.dpo, objective="sigmoid", objective_args="", steps=cfg.extras.guidance_steps, select_best=False,
            eval_every=cfg.extras.guidance_steps, reference="cached"))

        def train_guidance():
            guide_dir = os.path.join(workdir, "guidance")
            os.makedirs(guide_dir, exist_ok=True)
            log = MetricsLog(os.path.join(guide_dir, "metrics.jsonl"))
            params, _, _ = train_dpo(guide_cfg, mesh, sft_params, param_shardings, pairs, problems, guide_dir, log)
            return objective_extras.guidance_extras(params, cfg.model, pairs.arrays, batch)

        extras, _ = objective_extras.cached_extras(
            "guidance", cache, sft_params, arrays, {"config": config_to_dict(guide_cfg)}, train_guidance)
        arrays.update(extras)
    return ArrayDataset(arrays)


def reference_for(cfg: ArithDPOConfig, model: DecoderLM, sft_params, data: ArrayDataset, workdir: str):
    """(frozen reference params or None, data) for `dpo.reference`: "online" passes the SFT params as the frozen
    reference; "cached" adds the SFT policy's per-token log-probs to every pair or list (computed once, cached on
    disk under a content hash); "sync" keeps the reference in the train state; reference-free objectives get
    neither. Pairs that already carry reference_chosen / reference_rejected keep them (a reference the caller
    built, e.g. APO's extrapolation of two checkpoints, `jaxalign.algorithms.iterative`)."""
    spec = get_spec(cfg.dpo.objective)
    if not spec.needs_reference or cfg.dpo.reference == "sync":
        return None, data
    if "reference_chosen" in data.arrays:  # the caller computed the reference (APO's extrapolated checkpoints)
        return None, data
    if cfg.dpo.reference == "online":
        return sft_params, data
    tok = CharTokenizer()
    tokenization = {"tokenizer": "CharTokenizer", "chars": tok.CHARS, "pad": tok.PAD_ID, "eos": tok.EOS_ID}
    cached = cached_list_reference_logprobs if spec.family == "listwise" else cached_reference_logprobs
    arrays, _ = cached(cache_dir(cfg, workdir), logits_fn(model), sft_params, data.arrays, tokenization,
                       cfg.eval_batch_size)
    return None, ArrayDataset({**data.arrays, **arrays})


def training_data(cfg: ArithDPOConfig, sft_params, problems: Problems, workdir: str) -> tuple[ArrayDataset, dict]:
    """The pairs, or for a listwise objective the ranked lists, with their statistics (both from the same cached
    on-policy samples)."""
    pairs, stats = on_policy_pairs(cfg, sft_params, problems.train, workdir)
    if get_spec(cfg.dpo.objective).family != "listwise":
        return pairs, stats
    from jaxalign.experiments.ranked_lists import on_policy_lists  # imports this module

    lists, list_stats = on_policy_lists(cfg, sft_params, problems.train, workdir)
    return lists, {**stats, **list_stats}


def select_checkpoint(history: list[dict]) -> dict:
    """The over-optimisation guard's choice: the evaluated step with the best validation accuracy, the earliest
    one on ties (it stays closest to the reference)."""
    return max(history, key=lambda r: (r["val/accuracy"], -r["step"]))


def _val_record(record: dict) -> dict:
    return {k: record[k] for k in ("step", "val/accuracy", "val/mean_length")}


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


def validate_config(cfg: ArithDPOConfig, mesh) -> None:
    check_model_fits_mesh(cfg.model, mesh)
    check_batch_fits_mesh(cfg.sft.batch_size // cfg.sft.grad_accum_steps, mesh, "sft.batch_size / grad_accum_steps")
    check_batch_fits_mesh(cfg.dpo.batch_size // cfg.dpo.grad_accum_steps, mesh, "dpo.batch_size / grad_accum_steps")
    check_batch_fits_mesh(cfg.dpo.list_batch_size // cfg.dpo.grad_accum_steps, mesh,
                          "dpo.list_batch_size / grad_accum_steps")
    needed = completion_len(cfg.task)
    if cfg.model.max_len < PROMPT_LEN + needed:
        raise ValueError(f"model.max_len={cfg.model.max_len} is too short for ARITH with task.max_recaps="
                         f"{cfg.task.max_recaps}; expected at least {PROMPT_LEN + needed} (prompt {PROMPT_LEN} + "
                         f"completion {needed})")


@dataclasses.dataclass(frozen=True)
class ExperimentStart:
    """What every ARITH experiment holds after its first phase (`start_experiment`)."""

    mesh: Any
    problems: Problems
    log: MetricsLog
    sft_params: Any
    param_shardings: Any


def start_experiment(cfg: Any, base: ArithDPOConfig, workdir: str, validated: ArithDPOConfig | None = None,
                     check: Callable[[Problems], None] | None = None) -> ExperimentStart:
    """The first phase every ARITH experiment shares (the main job, Curry-DPO, the iterative algorithms, OREO, ...).

    `validated` (default `base`: the config whose DPO phase will run) is checked against the mesh, then `check`
    (the experiment's own checks, e.g. that it asks for no more prompts than exist) runs on the problem split, all
    BEFORE the work directory is claimed for `cfg`: a refused config leaves no config.json behind to block the
    corrected re-run. Then the main job's SFT phase (restored when it already finished; a benchmark may seed
    WORKDIR/checkpoints/sft with a shared policy), its parameters as one local copy for sampling and references."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(base.mesh)
    validate_config(validated or base, mesh)
    problems = split(base)
    if check is not None:
        check(problems)
    claim_workdir(cfg, workdir)
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    sft_params, param_shardings = train_sft(base, mesh, problems, workdir, log)
    return ExperimentStart(mesh, problems, log, host_local(sft_params), param_shardings)


def finish_experiment(workdir: str, results: dict, plot: Callable[[str], None], png_name: str) -> dict:
    """Write results.json and the experiment's PNG (`plot(path)`) from the primary process; returns `results`."""
    if is_primary():  # every process computed the same results; one writes them
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        plot(os.path.join(workdir, png_name))
    return results


def run(cfg: ArithDPOConfig, workdir: str) -> dict:
    """Run (or resume) the whole pipeline in `workdir`; returns and writes results.json."""
    clock = time.perf_counter()
    start = start_experiment(cfg, cfg, workdir)
    mesh, problems, log, sft_params, param_shardings = (start.mesh, start.problems, start.log, start.sft_params,
                                                        start.param_shardings)
    data, data_stats = training_data(cfg, sft_params, problems, workdir)
    dpo_params, last_params, guard = train_dpo(cfg, mesh, sft_params, param_shardings, data, problems, workdir, log)

    sft_eval, sft_correct = greedy_eval(sft_params, cfg.model, problems.test, cfg.eval_batch_size)
    dpo_eval, dpo_correct = greedy_eval(dpo_params, cfg.model, problems.test, cfg.eval_batch_size)
    if last_params is dpo_params:  # the guard kept the last step: its evaluation is the one just done
        last_eval, last_correct = dpo_eval, dpo_correct
    else:
        last_eval, last_correct = greedy_eval(last_params, cfg.model, problems.test, cfg.eval_batch_size)
    on_sft_correct = lambda correct: float(correct[sft_correct].mean()) if sft_correct.any() else float("nan")  # noqa: E731
    results = {
        "sft_accuracy": sft_eval["accuracy"],
        "dpo_accuracy": dpo_eval["accuracy"],
        "dpo_accuracy_on_sft_correct": on_sft_correct(dpo_correct),
        "sft_mean_length": sft_eval["mean_length"],
        "dpo_mean_length": dpo_eval["mean_length"],
        "dpo_last_step_accuracy": last_eval["accuracy"],
        "dpo_last_step_accuracy_on_sft_correct": on_sft_correct(last_correct),
        "dpo_last_step_mean_length": last_eval["mean_length"],
        "guard": guard,
        "carry_share": arith.carry_share(cfg.task.num_operands),
        "num_test_prompts": int(len(problems.test)),
        "sft_examples_dropped_per_epoch": dropped_per_epoch(len(problems.train), cfg.sft.batch_size),
        **data_stats,
        "steps": {"sft": cfg.sft.steps, "dpo": cfg.dpo.steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(dpo_params),
        "config": config_to_dict(cfg),
    }
    return finish_experiment(workdir, results,
                             lambda path: _plot(guard["validation_history"], log.records("dpo"), path),
                             "dpo_validation.png")


def _plot(history: list[dict], records: list[dict], path: str) -> None:
    """Validation accuracy and response length over DPO steps, with the selected checkpoint marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_acc.plot(steps, [r["val/accuracy"] for r in history], marker="o")
    best = select_checkpoint(history)
    ax_acc.axvline(best["step"], color="gray", linestyle="--", label=f"selected step {best['step']}")
    ax_acc.set(xlabel="DPO step", ylabel="validation accuracy (greedy)", title="DPO on ARITH")
    ax_acc.legend()
    ax_len.plot(steps, [r["val/mean_length"] for r in history], marker="o", label="mean response length")
    dpo = [r for r in records if "rewards/margin" in r]
    if dpo:
        twin = ax_len.twinx()
        twin.plot([r["step"] for r in dpo], [r["rewards/margin"] for r in dpo], color="tab:orange", alpha=0.6)
        twin.set_ylabel("reward margin", color="tab:orange")
    ax_len.set(xlabel="DPO step", ylabel="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
