"""The phases ARITH experiments share: start (checks before the work directory is claimed, then SFT), supervised
training, the preference phase with ARITH's validation guard, objective extras, and finish (results.json + plot)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxalign import paths
from jaxalign.algorithms import objective_extras
from jaxalign.data.iterator import ArrayDataset
from jaxalign.distributed import host_local, is_primary
from jaxalign.experiments.arith_kit.config import PROMPT_LEN, ArithDPOConfig, SFTConfig, completion_len
from jaxalign.experiments.arith_kit import evaluation
from jaxalign.experiments.arith_kit.data import Problems, on_policy_lists, on_policy_pairs, sft_dataset, split
from jaxalign.losses import get_spec
from jaxalign.models.llama import DecoderLM, check_model_fits_mesh
from jaxalign.rundir import RunDir, claim, config_to_dict, write_json_atomic
from jaxalign.sharding import check_batch_fits_mesh, make_mesh
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.loop import MetricsLog, train_loop
from jaxalign.train.optim import make_optimizer
from jaxalign.train.preference import (
    CustomLoss,
    Evaluation,
    select_checkpoint,
    selection_checkpoints,
    train_preference,
)
from jaxalign.train.setup import sharded_train_state
from jaxalign.train.step import jit_train_step, make_train_step, sft_loss_fn

VALIDATION_KEYS = ("val/accuracy", "val/mean_length")


def validate_config(cfg: ArithDPOConfig, mesh) -> None:
    """The checks that need the mesh or the task together with the model; run before any work is done."""
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
    with Checkpointer(RunDir(workdir).checkpoints(phase), cfg.checkpoint,
                      metadata={"phase": phase, "model": dataclasses.asdict(cfg.model)}) as ckpt:
        state = ckpt.restore_latest(state) or state
        step_fn = jit_train_step(make_train_step(sft_loss_fn(model), sft.grad_accum_steps), mesh, shardings, None)
        state = train_loop(
            state=state, step_fn=step_fn, frozen=None, dataset=dataset, batch_size=sft.batch_size,
            num_steps=sft.steps, seed=cfg.seed, mesh=mesh, checkpointer=ckpt, metrics_log=log, desc=phase,
            token_keys=("attention_mask",), show_progress=cfg.show_progress, log_every=cfg.log_every,
            on_nonfinite=sft.on_nonfinite,
        )
    return state.params, shardings.params


def cache_dir(cfg: ArithDPOConfig, workdir: str) -> str:
    return cfg.dpo.reference_cache_dir or RunDir(workdir).reference_cache


# What the content hash of a cached reference covers beyond the parameters and the tokens.
TOKENIZATION = {"tokenizer": "CharTokenizer", "chars": CharTokenizer.CHARS, "pad": CharTokenizer.PAD_ID,
                "eos": CharTokenizer.EOS_ID}


def with_objective_extras(cfg: ArithDPOConfig, mesh, sft_params, pairs: ArrayDataset, problems: Problems,
                          workdir: str) -> ArrayDataset:
    """The pairs plus whatever `dpo.objective` reads beyond log-probs (`jaxalign.algorithms.objective_extras`),
    each product cached on disk under a content hash so that runs sharing the SFT policy and pairs build it once.
    The guidance policy some objectives need is a sigmoid-DPO run of this task's own preference phase."""
    guide_cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(
        cfg.dpo, objective="sigmoid", objective_args="", steps=cfg.extras.guidance_steps, select_best=False,
        eval_every=cfg.extras.guidance_steps, reference="cached"))

    def train_guidance():
        guide = RunDir(workdir).sub("guidance")
        guide_log = MetricsLog(guide.metrics)
        params, _, _ = train_dpo(guide_cfg, mesh, sft_params, pairs, problems, guide.root, guide_log)
        return params

    arrays = objective_extras.build_extras(
        get_spec(cfg.dpo.objective), pairs.arrays, cache_dir=cache_dir(cfg, workdir), sft_params=sft_params,
        model_cfg=cfg.model, extras_cfg=cfg.extras, seed=cfg.seed, batch_size=cfg.eval_batch_size,
        prompt_len=PROMPT_LEN, reference_mode=cfg.dpo.reference, train_guidance=train_guidance,
        guidance_description={"config": config_to_dict(guide_cfg)}, show_progress=cfg.show_progress)
    return ArrayDataset(arrays)


def validation(cfg: ArithDPOConfig, problems: Problems) -> Evaluation:
    """ARITH's over-optimisation guard: greedy accuracy on the validation problems, the best step kept."""

    def evaluate(params) -> dict:
        val, _ = evaluation.greedy_eval(params, cfg.model, problems.validation, cfg.eval_batch_size)
        return {"val/accuracy": val["accuracy"], "val/mean_length": val["mean_length"]}

    return Evaluation(evaluate, VALIDATION_KEYS, select="val/accuracy")


def train_dpo(cfg: ArithDPOConfig, mesh, sft_params, data: ArrayDataset, problems: Problems, workdir: str,
              log: MetricsLog, custom: CustomLoss | None = None):
    """Phases 3 and 4: the preference phase (`jaxalign.train.preference`) from the SFT policy with it as reference,
    on pairs (`on_policy_pairs`) or, for a listwise objective, ranked lists (`on_policy_lists`), validated with
    `validation` every dpo.eval_every steps and checkpointed at each; with `custom`, its loss on `data` as given (no
    objective extras, no reference added).

    Returns (selected params, last-step params, guard record)."""
    if custom is None and not cfg.dpo.listwise:
        data = with_objective_extras(cfg, mesh, sft_params, data, problems, workdir)
    lora = cfg.lora.config()
    metadata = {"phase": "dpo", "model": dataclasses.asdict(cfg.model),
                **({"lora": dataclasses.asdict(lora)} if lora is not None else {})}
    guard_eval = validation(cfg, problems)
    result = train_preference(
        cfg.dpo, model_cfg=cfg.model, mesh=mesh, init_params=sft_params, data=data,
        directory=RunDir(workdir).checkpoints("dpo"), log=log, evaluation=guard_eval, seed=cfg.seed,
        # ARITH checkpoints at every validation step whether or not it selects (the comparisons restore them).
        checkpoint=selection_checkpoints(cfg.dpo, cfg.checkpoint),
        metadata=metadata, cache_dir=cache_dir(cfg, workdir), tokenization=TOKENIZATION, lora=cfg.lora,
        custom=custom, separator_id=CharTokenizer().encode(";")[0], eval_batch_size=cfg.eval_batch_size,
        show_progress=cfg.show_progress, log_every=cfg.log_every)
    history = result.history
    best = select_checkpoint(history, guard_eval.select)
    guard = {"selected_step": best["step"], "selected_val_accuracy": best["val/accuracy"],
             "last_step": cfg.dpo.steps, "last_val_accuracy": history[-1]["val/accuracy"],
             "validation_history": history}
    return result.selected, result.last, guard


def training_data(cfg: ArithDPOConfig, sft_params, problems: Problems, workdir: str) -> tuple[ArrayDataset, dict]:
    """The pairs, or for a listwise objective the ranked lists, with their statistics (both from the same cached
    on-policy samples)."""
    pairs, stats = on_policy_pairs(cfg, sft_params, problems.train, workdir)
    if not cfg.dpo.listwise:
        return pairs, stats
    lists, list_stats = on_policy_lists(cfg, sft_params, problems.train, workdir)
    return lists, {**stats, **list_stats}


@dataclasses.dataclass(frozen=True)
class ExperimentStart:
    """What every ARITH experiment holds after its first phase (`start_experiment`)."""

    mesh: Any
    problems: Problems
    log: MetricsLog
    sft_params: Any


def start_experiment(cfg: Any, base: ArithDPOConfig, workdir: str, validated: ArithDPOConfig | None = None,
                     check: Callable[[Problems], None] | None = None) -> ExperimentStart:
    """The first phase every ARITH experiment shares (the main job, Curry-DPO, the iterative algorithms, OREO, ...).

    `validated` (default `base`: the config whose DPO phase will run) is checked against the mesh, then `check`
    (the experiment's own checks, e.g. that it asks for no more prompts than exist) runs on the problem split, all
    BEFORE the work directory is claimed for `cfg`: a refused config leaves no config.json behind to block the
    corrected re-run. Then the main job's SFT phase (restored when it already finished; a benchmark may seed
    WORKDIR/checkpoints/sft with a shared policy), its parameters as one local copy for sampling and references."""
    mesh = make_mesh(base.mesh)
    validate_config(validated or base, mesh)
    problems = split(base)
    if check is not None:
        check(problems)
    run = RunDir(workdir)
    paths.makedirs(run.root)
    claim(cfg, workdir)
    log = MetricsLog(run.metrics)
    sft_params, _ = train_sft(base, mesh, problems, workdir, log)
    return ExperimentStart(mesh, problems, log, host_local(sft_params))


def finish_experiment(workdir: str, results: dict, plot: Callable[[str], None], png_name: str) -> dict:
    """Write results.json and the experiment's PNG (`plot(path)`) from the primary process; returns `results`."""
    if is_primary():  # every process computed the same results; one writes them
        run = RunDir(workdir)
        write_json_atomic(run.results, results)
        plot(run.file(png_name))
    return results
