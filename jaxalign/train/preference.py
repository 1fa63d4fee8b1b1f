"""The preference-training phase: one config, one function, used by every experiment that trains on preferences.

A phase takes an initial policy (an SFT model, a loaded Hugging Face checkpoint, the previous iterate of an
iterative algorithm) and preference data (pairs, ranked lists, or anything a custom loss reads), and:

1. builds the train state: full parameters (plus a value head when the objective declares one), or LoRA adapters
   over the frozen initial policy (Hu et al. 2021);
2. resolves the reference (`PreferenceConfig.reference`): "cached" per-token reference log-probs computed once and
   stored under a content hash, "online" a frozen copy run every step, "sync" TR-DPO's periodic soft update
   (Gorbatovski et al. 2024, ref <- alpha * policy + (1 - alpha) * ref every k steps), or none for reference-free
   objectives;
3. assembles the loss: the registered objective (pairwise, reference-free, unpaired or listwise) with its
   hyper-parameters and the chosen-NLL regulariser (RPO, Pang et al. 2024), or a caller's `CustomLoss`;
4. trains with the thin loop (`jaxalign.train.loop.train_loop`), checkpointed and resumable bit for bit;
5. calls the caller's `evaluate(policy_params) -> metrics` at step 0 and every `eval_every` steps;
6. with `select_best`, returns the evaluated checkpoint with the best `select_metric` (earliest on ties: it stays
   closest to the reference), the guard against over-optimisation that a fixed-reference DPO needs.

This module knows nothing about tasks or files: what to evaluate and which data to train on are the caller's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax

from jaxalign.data.packing import PackedPairDataset
from jaxalign.distributed import host_local
from jaxalign.losses import get_spec, hyperparameter_defaults
from jaxalign.losses import objective_kwargs as registry_objective_kwargs
from jaxalign.losses.dpo import check_beta
from jaxalign.models.llama import DecoderLM, ModelConfig
from jaxalign.models.lora import LoraConfig, merge_lora
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.listwise import cached_list_reference_logprobs, listwise_loss_fn
from jaxalign.train.loop import ON_NONFINITE, MetricsLog, train_loop
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.reference import ReferenceSync, cached_reference_logprobs
from jaxalign.train.setup import sharded_lora_train_state, sharded_train_state
from jaxalign.train.unpaired import (UNPAIRED_TOKEN_KEYS, cached_unpaired_reference_logprobs, is_unpaired,
                                     unpaired_loss_fn)
from jaxalign.train.step import (
    dpo_loss_fn,
    initial_objective_state,
    jit_train_step,
    logits_fn,
    lora_loss_fn,
    make_train_step,
    objective_extra_params,
    packing_refusal,
)
from jaxalign.validation import (
    FieldError,
    check_choice,
    check_divides,
    check_int,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

REFERENCE_MODES = ("online", "cached", "sync")
PAIR_TOKEN_KEYS = ("chosen_attention_mask", "rejected_attention_mask")
LIST_TOKEN_KEYS = ("list_attention_mask",)


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """How a preference phase trains (every field can be overridden from the command line as dpo.FIELD=VALUE).

    objective: any registered objective (`jaxalign objectives`). Listwise objectives train on ranked lists,
        `list_batch_size` lists per step; every other family on pairs, `batch_size` pairs per step. An experiment's
        beta, label_smoothing, objective_args and sft_weight are its settings for its own objective: choosing
        another one (`loss=NAME`) puts them back to the defaults below unless they are set too (`RESET_WITH`).
    beta: the KL strength (Rafailov et al. 2023, eq. 7), passed to every objective that takes one (or its
        registered equivalent, e.g. ADPO's tau = 1/beta); none: the objective's own default (0.1 for DPO, the
        paper's and TRL's; 2.0 for SimPO). label_smoothing only when set; `objective_args` sets any other
        hyper-parameter or TRL's loss modifiers, e.g. "tau=0.1" or "ld_alpha=0.5,wpo=true", or one at a time:
        dpo.objective_args.tau=0.1 (a sweep can vary it: dpo.objective_args.tau=0.1,0.2).
    sft_weight: weight of the chosen-NLL regulariser added to the objective (RPO, Pang et al. 2024); 0 disables it.
    reference: "cached" (per-token log-probs of the initial policy, computed once and cached on disk under a content
        hash in `reference_cache_dir`, default WORKDIR/reference_cache), "online" (a frozen copy runs a forward pass
        every step) or "sync" (TR-DPO: every `sync_every` steps ref <- sync_alpha * policy + (1 - sync_alpha) * ref).
    eval_every: the caller's evaluation runs (and, with select_best, a checkpoint is kept) every this many steps.
    select_best: return the evaluated checkpoint with the best metric instead of the last one.
    packing: padding-free training of pairwise objectives (one process; not with listwise objectives, a custom
        loss, or objectives whose extras need the model's padded outputs).
    on_nonfinite: "stop" (a non-finite loss or gradient norm stops the phase, naming the last good checkpoint) or
        "skip-batch" (the batch's update is skipped and counted; `jaxalign run --on-nonfinite=skip-batch`).
    """

    steps: int = 100  # optimizer steps of the phase
    batch_size: int = 64  # preference pairs per step
    list_batch_size: int = 16  # ranked lists per step (listwise objectives)
    grad_accum_steps: int = 1  # microbatches per step, accumulated exactly
    beta: float | None = None
    label_smoothing: float | None = None  # cDPO's assumed label-flip rate epsilon (only objectives that take it)
    objective: str = "sigmoid"
    objective_args: str = ""  # the objective's own hyper-parameters, "name=value,name=value"
    sft_weight: float = 0.0
    optim: OptimConfig = OptimConfig(learning_rate=5e-6, warmup_steps=10)
    eval_every: int = 25
    select_best: bool = True
    reference: str = "cached"
    reference_cache_dir: str = ""  # where reference="cached" keeps its log-probs ("": WORKDIR/reference_cache)
    sync_every: int = 50  # reference="sync": steps between reference updates (TR-DPO)
    sync_alpha: float = 0.6  # reference="sync": the policy's weight in each update (TR-DPO's alpha)
    on_nonfinite: str = "stop"
    logprob_chunk: int = 0  # >0: log-probs from the hidden states this many positions at a time (no full logits)
    # true: each pair batch is packed first-fit into rows as long as its longest pair
    # (jaxalign.data.packing.pack_pair_batch)
    # and the policy and online reference run over those rows; same losses as padded, fewer padded tokens computed
    packing: bool = False

    # The experiment's values of these were chosen for its objective (`jaxalign.overrides`).
    RESET_WITH: ClassVar[dict[str, tuple[str, ...]]] = {
        "objective": ("beta", "label_smoothing", "objective_args", "sft_weight")}
    ARGUMENT_FIELDS: ClassVar[tuple[str, ...]] = ("objective_args",)

    def __post_init__(self):
        if self.beta is not None:
            check_beta(self.beta)
            check_positive("dpo", "beta", self.beta)  # inf passes check_beta and trains to nan
        for name in ("steps", "batch_size", "list_batch_size", "grad_accum_steps", "eval_every"):
            check_positive_int("dpo", name, getattr(self, name))
        if self.label_smoothing is not None:
            check_number("dpo", "label_smoothing", self.label_smoothing, low=0, high=0.5)
        check_non_negative("dpo", "sft_weight", self.sft_weight)
        check_int("dpo", "sync_every", self.sync_every, minimum=0)
        check_number("dpo", "sync_alpha", self.sync_alpha, low=0, high=1, low_open=True)
        check_choice("dpo", "reference", self.reference, REFERENCE_MODES)
        check_choice("dpo", "on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_int("dpo", "logprob_chunk", self.logprob_chunk, minimum=0)
        if not isinstance(self.packing, bool):
            raise FieldError("dpo", "packing", self.packing, "true or false")
        if self.reference == "sync":
            ReferenceSync(self.sync_every, self.sync_alpha)  # validates both
        kwargs = objective_kwargs(self)  # validates the objective name and its arguments now, not after an SFT phase
        if self.packing and (self.listwise or packing_refusal(self.objective, bool(kwargs.get("wpo", False)))):
            raise ValueError(f"dpo.packing: the objective {self.objective!r} is listwise (it trains on lists, not "
                             f"pairs); set dpo.packing=false" if self.listwise
                             else packing_refusal(self.objective, bool(kwargs.get("wpo", False))))
        batch = "list_batch_size" if self.listwise else "batch_size"  # the one a step splits into micro-batches
        check_divides("dpo", batch, getattr(self, batch), "grad_accum_steps", self.grad_accum_steps)

    @property
    def reference_sync(self) -> ReferenceSync | None:
        return ReferenceSync(self.sync_every, self.sync_alpha) if self.reference == "sync" else None

    @property
    def listwise(self) -> bool:
        return get_spec(self.objective).family == "listwise"


def objective_kwargs(dpo: PreferenceConfig) -> dict[str, Any]:
    """The hyper-parameters `dpo.objective` receives (`jaxalign.losses.objective_kwargs`: beta or its registered
    alias when set, label_smoothing when set, then `objective_args`); unknown names are one clear error."""
    return registry_objective_kwargs(dpo.objective, dpo.beta, dpo.label_smoothing, dpo.objective_args)


def resolved_hyperparameters(dpo: PreferenceConfig) -> dict[str, Any]:
    """Every hyper-parameter the objective trains with: its own defaults, then what the config sets."""
    return {**hyperparameter_defaults(dpo.objective), **objective_kwargs(dpo)}


def implicit_reward_beta(dpo: PreferenceConfig) -> float:
    """The beta of the implicit reward beta * (log pi - log ref) reported in evaluations (Rafailov et al. 2023,
    eq. 5): dpo.beta, else the objective's own beta, else DPO's 0.1 for objectives that take none."""
    if dpo.beta is not None:
        return dpo.beta
    beta = resolved_hyperparameters(dpo).get("beta")
    return float(beta) if isinstance(beta, (int, float)) else 0.1


def objective_lines(cfg: Any, prefix: str = "") -> list[str]:
    """"KEY: describe_objective(...)" for every preference phase in a (nested) config, e.g. "dpo: sigmoid(...)"."""
    if isinstance(cfg, PreferenceConfig):
        return [f"{prefix.rstrip('.')}: {describe_objective(cfg)}"]
    if not dataclasses.is_dataclass(cfg):
        return []
    return [line for f in dataclasses.fields(cfg)
            for line in objective_lines(getattr(cfg, f.name), f"{prefix}{f.name}.")]


def describe_objective(dpo: PreferenceConfig) -> str:
    """One line saying what a preference phase optimises, every hyper-parameter resolved (printed at the start of
    a run, so an experiment's regulariser never reaches another objective unnoticed), e.g.
    "sigmoid(beta=2.0, label_smoothing=0.0) + 1.0 x chosen NLL (RPO); reference: cached"."""
    spec = get_spec(dpo.objective)
    arguments = ", ".join(f"{k}={v}" for k, v in resolved_hyperparameters(dpo).items() if v is not None)
    regulariser = f" + {dpo.sft_weight:g} x chosen NLL (RPO)" if dpo.sft_weight else ""
    reference = dpo.reference if spec.needs_reference else "none (reference-free)"
    return f"{dpo.objective}({arguments}){regulariser}; reference: {reference}"


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA for a preference phase (Hu et al. 2021, `jaxalign.models.lora`). rank 0 (the default) trains every
    parameter; rank > 0 trains adapters on the kernels `targets` selects (comma-separated path patterns) and nothing
    else, the initial policy being both their frozen base and the reference (one copy of its weights). The phase
    returns, evaluates and checkpoints-for-selection the merged policy W0 + (alpha / rank) A B."""

    rank: int = 0  # LoRA rank (0: train every parameter, no adapters)
    alpha: float = 16.0  # the adapters' scale is alpha / rank
    targets: str = "attn/q,attn/v"  # comma-separated path patterns of the kernels that get adapters

    def __post_init__(self):
        check_int("lora", "rank", self.rank, minimum=0)  # 0 = no LoRA
        check_positive("lora", "alpha", self.alpha)
        self.config()  # LoraConfig's own checks of alpha and the patterns

    def config(self) -> LoraConfig | None:
        if not self.rank:
            return None
        targets = tuple(part.strip() for part in self.targets.split(",") if part.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=targets)


@dataclasses.dataclass(frozen=True)
class CustomLoss:
    """A loss the phase trains instead of `dpo.objective` (objectives that are not registered, e.g. TRPA, BRAIn,
    DDO), with everything else unchanged (optimizer, checkpoints, evaluation, selection, resume).

    loss_fn: `jaxalign.train.step` signature, (params, frozen, batch) -> (sum of per-item losses, (items, metrics)).
    batch_size: items per step (rows of `data`). token_keys: attention-mask keys counted for tokens/s.
    frozen: frozen parameters passed to every step (None: everything frozen is precomputed in the batch)."""

    loss_fn: Callable
    batch_size: int
    token_keys: tuple[str, ...]
    frozen: Any = None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The caller's evaluation of a policy: `fn(policy_params) -> {metric: value}`, run at step 0 (the initial
    policy) and every `dpo.eval_every` steps. `keys`: the metrics `fn` returns (they identify its records in
    metrics.jsonl on resume). `select`: the metric `select_best` maximises (or minimises, `maximize=False`)."""

    fn: Callable[[Any], dict]
    keys: tuple[str, ...]
    select: str | None = None
    maximize: bool = True


@dataclasses.dataclass(frozen=True)
class PreferenceResult:
    """selected: the returned policy (the best evaluated checkpoint under select_best, else the last step); last:
    the last step's policy (adapters merged under LoRA); state_params: the trained parameters as stored (the adapters
    under LoRA); history: every evaluation record (step + metrics), step 0 first; selected_step."""

    selected: Any
    last: Any
    state_params: Any
    history: list[dict]
    selected_step: int


def select_checkpoint(history: list[dict], metric: str, maximize: bool = True) -> dict:
    """The evaluated step with the best `metric`, the earliest one on ties (it stays closest to the reference)."""
    sign = 1.0 if maximize else -1.0
    return max(history, key=lambda r: (sign * r[metric], -r["step"]))


def with_arrays(data: Any, arrays: dict) -> Any:
    """`data` (an ArrayDataset or a BucketedDataset) with its arrays replaced, everything else kept."""
    return dataclasses.replace(data, arrays=arrays)


def resolve_reference(cfg: PreferenceConfig, model: DecoderLM, init_params: Any, data: Any, cache_dir: str,
                      tokenization: dict, batch_size: int) -> tuple[Any, Any]:
    """(frozen reference params or None, data) for `cfg.reference`: "online" passes the initial policy as the
    frozen reference; "cached" adds its per-token log-probs to every pair or list (computed once, cached on disk
    under a content hash of the parameters, the data and `tokenization`); "sync" keeps the reference in the train
    state; reference-free objectives get neither. Data that already carries reference_chosen / reference_rejected
    keeps them (a reference the caller built, e.g. APO's extrapolation of two checkpoints)."""
    spec = get_spec(cfg.objective)
    if not spec.needs_reference or cfg.reference == "sync" or "reference_chosen" in data.arrays:
        return None, data
    if cfg.reference == "online":
        return init_params, data
    cached = (cached_list_reference_logprobs if spec.family == "listwise" else
              cached_unpaired_reference_logprobs if is_unpaired(data.arrays) else cached_reference_logprobs)
    # One local copy: every process computes the same cache from the same bytes.
    arrays, _ = cached(cache_dir, logits_fn(model), host_local(init_params), data.arrays, tokenization, batch_size)
    return None, with_arrays(data, {**data.arrays, **arrays})


def _loss(cfg: PreferenceConfig, model: DecoderLM, custom: CustomLoss | None, separator_id: int | None,
          unpaired: bool = False):
    """(loss_fn, items per step, token keys) of the phase; `unpaired`: the data are labelled single completions."""
    if cfg.packing and (custom is not None or cfg.listwise):
        raise ValueError(f"dpo.packing applies to registered pairwise objectives; this phase trains "
                         f"{'a custom loss' if custom is not None else f'the listwise {cfg.objective!r}'}: set "
                         f"dpo.packing=false")
    if custom is not None:
        return custom.loss_fn, custom.batch_size, custom.token_keys
    if cfg.listwise:
        if cfg.logprob_chunk:
            raise ValueError(f"dpo.logprob_chunk applies to pairwise objectives; {cfg.objective!r} is listwise: "
                             "set dpo.logprob_chunk=0")
        loss = listwise_loss_fn(model, cfg.objective, sft_weight=cfg.sft_weight, separator_id=separator_id,
                                **objective_kwargs(cfg))
        return loss, cfg.list_batch_size, LIST_TOKEN_KEYS
    if unpaired:
        loss = unpaired_loss_fn(model, cfg.objective, sft_weight=cfg.sft_weight, logprob_chunk=cfg.logprob_chunk,
                                packing=cfg.packing, **objective_kwargs(cfg))
        return loss, cfg.batch_size, UNPAIRED_TOKEN_KEYS
    loss = dpo_loss_fn(model, cfg.objective, sft_weight=cfg.sft_weight, logprob_chunk=cfg.logprob_chunk,
                       packing=cfg.packing, **objective_kwargs(cfg))
    return loss, cfg.batch_size, PAIR_TOKEN_KEYS


def selection_checkpoints(cfg: PreferenceConfig, checkpoint: CheckpointConfig) -> CheckpointConfig:
    """The checkpoint cadence selection needs: one at every evaluation, all of them kept."""
    keep = max(cfg.steps // cfg.eval_every + 1, 1)
    return dataclasses.replace(checkpoint, every_steps=cfg.eval_every, keep_last=keep)


def train_preference(cfg: PreferenceConfig, *, model_cfg: ModelConfig, mesh, init_params: Any, data: Any,
                     directory: str, log: MetricsLog, evaluation: Evaluation, seed: int,
                     checkpoint: CheckpointConfig, metadata: dict, cache_dir: str, tokenization: dict,
                     lora: LoraSection = LoraSection(), custom: CustomLoss | None = None,
                     separator_id: int | None = None, eval_batch_size: int = 256, show_progress: bool = True,
                     log_every: int = 10, phase: str = "dpo") -> PreferenceResult:
    """Train `cfg.objective` (or `custom`) from `init_params` on `data`, checkpointed in `directory` and resumed from
    there; see the module docstring. `data`: an ArrayDataset or BucketedDataset of pairs, lists, or whatever `custom`
    reads; objective extras the caller built are already in it. `checkpoint`: the cadence without selection (with
    `cfg.select_best` there is one checkpoint per evaluation, all kept, `selection_checkpoints`). `metadata`: stored
    with every checkpoint and checked on resume. `cache_dir` / `tokenization`: where the cached reference lives and
    what, beyond parameters and tokens, its content hash covers. `separator_id`: listwise objectives' step
    separator token. Metrics go to `log` under `phase`."""
    lora_cfg = lora.config()
    if custom is not None and (lora_cfg is not None or cfg.reference == "sync"):
        raise ValueError("a custom loss trains full parameters against a precomputed or frozen reference: set "
                         "lora.rank=0 and dpo.reference to online or cached")
    if cfg.select_best and evaluation.select is None:
        raise ValueError("dpo.select_best needs an evaluation metric to select by")
    model = DecoderLM(model_cfg)
    tx = make_optimizer(cfg.optim, cfg.steps)
    key = jax.random.key(seed + 1)
    objective_state = initial_objective_state(cfg.objective) if custom is None else None
    if lora_cfg is None:
        extra = None if custom is not None else objective_extra_params(cfg.objective, model_cfg)
        state, shardings = sharded_train_state(model_cfg, tx, mesh, key, params=init_params,
                                               track_reference=cfg.reference == "sync",
                                               objective_state=objective_state, extra_params=extra)
        # The frozen reference is the model alone, without the objective's extra parameters (a value head).
        frozen_shardings = {k: v for k, v in shardings.params.items() if k not in (extra or {})}
    else:
        if cfg.reference == "sync" or objective_extra_params(cfg.objective, model_cfg):
            raise ValueError(f"lora.rank={lora.rank}: LoRA keeps the initial policy as the frozen base and reference; "
                             f"it cannot train with dpo.reference=sync or an objective with a value head (dro)")
        state, shardings, frozen_shardings = sharded_lora_train_state(model_cfg, lora_cfg, tx, mesh, key,
                                                                      objective_state=objective_state)

    def policy(params):
        """The policy's plain parameters: the adapters merged into the initial policy under LoRA."""
        return params if lora_cfg is None else merge_lora(init_params, params, lora_cfg)

    if custom is not None:
        frozen = custom.frozen
    else:
        frozen, data = resolve_reference(cfg, model, init_params, data, cache_dir, tokenization, eval_batch_size)
    if lora_cfg is not None:
        frozen = init_params  # the adapters' frozen base, and the reference unless its log-probs are cached
    if cfg.select_best:
        checkpoint = selection_checkpoints(cfg, checkpoint)
    with Checkpointer(directory, checkpoint, metadata=metadata) as ckpt:
        state = ckpt.restore_latest(state) or state
        log.truncate(phase, int(state.step))
        history = [{"step": r["step"], **{k: r[k] for k in evaluation.keys}}
                   for r in log.records(phase) if evaluation.keys[0] in r]
        if not history or history[0]["step"] != 0:  # step 0: the initial policy, a candidate for selection
            record = {"step": 0, **evaluation.fn(init_params)}
            log.write(dict(record, phase=phase))
            history.insert(0, record)

        def evaluate_hook(state, metrics):
            step = int(state.step)
            if step % cfg.eval_every and step != cfg.steps:
                return None
            record = evaluation.fn(policy(state.params))
            history.append({"step": step, **record})
            return record

        loss, batch_size, token_keys = _loss(cfg, model, custom, separator_id, is_unpaired(data.arrays))
        if cfg.packing:
            data = PackedPairDataset(data, cfg.grad_accum_steps, mesh.shape["data"] * mesh.shape["fsdp"])
        if lora_cfg is not None:
            loss = lora_loss_fn(loss, lora_cfg)
        step = make_train_step(loss, cfg.grad_accum_steps, reference_sync=cfg.reference_sync)
        step_fn = jit_train_step(step, mesh, shardings, None if frozen is None else frozen_shardings)
        state = train_loop(
            state=state, step_fn=step_fn, frozen=frozen, dataset=data, batch_size=batch_size, num_steps=cfg.steps,
            seed=seed + 1, mesh=mesh, checkpointer=ckpt, metrics_log=log, desc=phase, log_every=log_every,
            hooks=(evaluate_hook,), token_keys=token_keys, show_progress=show_progress,
            on_nonfinite=cfg.on_nonfinite,
        )
        last = policy(state.params)
        if history[-1]["step"] != cfg.steps:  # a finished run re-run whose last evaluation was not logged
            history.append({"step": cfg.steps, **evaluation.fn(last)})
        if not cfg.select_best:
            return PreferenceResult(last, last, state.params, history, cfg.steps)
        best = select_checkpoint(history, evaluation.select, evaluation.maximize)["step"]
        if best == cfg.steps:
            selected = last
        elif best == 0:
            selected = init_params
        else:
            selected = policy(ckpt.restore(best, state).params)
    return PreferenceResult(selected, last, state.params, history, best)


__all__ = ["CustomLoss", "Evaluation", "LoraSection", "PreferenceConfig", "PreferenceResult", "describe_objective",
           "implicit_reward_beta", "objective_kwargs", "objective_lines", "resolve_reference",
           "resolved_hyperparameters",
           "select_checkpoint", "train_preference"]
