"""OREO on your own trajectories and model: a Hugging Face (or `jaxalign convert`) checkpoint and a trajectory file.

    jaxalign run oreo_files --workdir DIR model.path=MODEL_DIR data.path=trajectories.jsonl [key=value ...]

OREO (Wang et al. 2024, "Offline Reinforcement Learning for LLM Multi-Step Reasoning", arXiv:2412.16145;
docs/algorithms.md, "OREO") learns a policy and a value model from offline trajectories with a terminal reward by
enforcing the soft Bellman equation, the loaded model being the reference (`jaxalign.algorithms.oreo`).

A trajectory row is {"prompt": ..., "steps": ["step 1", "step 2", ...], "reward": R} (`jaxalign data prepare
trajectory` validates the same rows): the steps are the reasoning steps, joined by `data.step_separator`, and R is
the terminal reward (1 / 0 for a correct / wrong final answer, or any number).

Pipeline (re-running the same command continues a killed run from its latest checkpoint):
1. Load the model (a Hugging Face directory or a `jaxalign convert` output): the initial policy and the frozen
   reference. The value model (`oreo.value_model`): "critic" (default), a separate copy of the model with a zero
   scalar head (V = 0 everywhere at the start, as the paper's critic), or "shared", a zero head on the policy trunk.
2. Validate and tokenize the file (`jaxalign.data.pipeline.prepare_dataset`, format "trajectory"): each step is
   tokenized on its own, so its last token is an exact position (`step_end_mask`); OREO's step-level states are
   the first token of every step (`step_starts_from_ends`). Skipped rows and truncations are counted in results.json.
3. Split off `data.eval_fraction` of the trajectories as held-out rows (a seeded permutation).
4. OREO (`train_oreo`): each step updates the critic on the value loss, then the actor on the policy loss at
   `oreo.level` (default "step": the file's step boundaries are the MDP's states) plus alpha times the
   full-vocabulary KL to the reference. `lora.rank` > 0 trains LoRA adapters on the policy only (the reference is
   their frozen base). Checkpoints in checkpoints/oreo_actor and checkpoints/oreo_critic; a non-finite loss,
   gradient norm or parameter stops the run naming the last good checkpoint.
5. Held-out evaluation at step 0, every `oreo.eval_every` steps and after the last step (`heldout_metrics`, exactly
   what results.json reports): eval/value_loss and eval/policy_loss (OREO's two objectives at `oreo.level` over
   every held-out trajectory, the policy loss with its alpha-weighted KL), eval/policy_bellman and eval/kl (the
   policy loss's two terms), and the value model at the last state of each trajectory, the state before its final
   token (for an EOS-terminated trajectory: after the last step's text, where the value of a finished solution is
   read): eval/value_last_mse, the mean of (V - R)^2, eval/value_last_mean, and eval/value_last_accuracy, the share
   of trajectories with V and R on the same side of the reward midpoint c = (min R + max R) / 2 over the training
   trajectories (0.5 for 0/1 rewards; the sign for +-1 rewards). At step 0 the policy is the reference and V = 0,
   so both losses and the MSE equal the mean of R^2 (the KL is 0). results.json has the before/after values
   (value_loss_before, ..._after), the whole history (eval_history), the data counts and the training losses;
   oreo_heldout.png plots them.
6. With `export.enabled=true`, the trained policy (adapters merged) is written to WORKDIR/export as a Hugging Face
   checkpoint of the source family, with the tokenizer files beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.oreo import (
    OreoConfig,
    init_critic_params,
    init_oreo_states,
    make_oreo_steps,
    reference_logits,
    train_oreo,
    value_forward,
)
from jaxalign.data import formats
from jaxalign.data.iterator import ArrayDataset
from jaxalign.data.tokenize import TokenizeConfig
from jaxalign.distributed import is_primary
from jaxalign.experiments.files_kit import (ExportSection, ModelSection, check_context, check_data_section,
                                            data_and_model_summary, export_family, export_policy, load_model,
                                            load_tokenizer, model_format, split_rows, tokenize_config,
                                            tokenizer_path)
from jaxalign.logprobs import masked_token_logprobs
from jaxalign.losses.oreo import oreo_policy_loss, oreo_value_loss, state_mask, token_kl
from jaxalign.models import hf
from jaxalign.models.heads import state_values
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.models.lora import init_lora, merge_lora
from jaxalign.rundir import RunDir, claim, config_to_dict, params_sha256, write_json_atomic
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.preference import LoraSection

EVAL_KEYS = ("eval/value_loss", "eval/policy_loss", "eval/policy_bellman", "eval/kl", "eval/value_last_mse",
             "eval/value_last_accuracy", "eval/value_last_mean")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The trajectory file and how it becomes token arrays (`jaxalign.data.tokenize`, format "trajectory").

    path: a .jsonl or .parquet file of {prompt, steps, reward} rows
    on_error: a malformed row stops the run naming file, line and field ("fail") or is skipped and counted ("skip")
    max_length: tokens of prompt + steps per trajectory; longer rows are handled by `on_overflow`
    max_prompt_length: tokens of the prompt at most (None: max_length - 1); a longer prompt is cut
    prompt_truncation: what a cut prompt keeps, "keep_end" (the question is usually last) or "keep_start";
        cut steps keep their start (the steps cut off are lost, and so is the EOS)
    on_overflow: a row over the limits is truncated and counted ("truncate"), dropped and counted ("drop") or
        refused naming its line ("error")
    step_separator: the text written after every step but the last (it belongs to the step it ends)
    eval_fraction: share of the trajectories (at least one) held out for evaluation, split by a permutation seeded
        by `seed`
    dataset_dir: where the TFDS build goes (default WORKDIR/data; point it at a `jaxalign data prepare --output`
        directory to reuse that build)."""

    path: str = ""
    on_error: str = "fail"
    max_length: int = 512
    max_prompt_length: int | None = None
    prompt_truncation: str = "keep_end"
    on_overflow: str = "truncate"
    step_separator: str = "\n"
    eval_fraction: float = 0.1
    dataset_dir: str = ""

    def __post_init__(self):
        check_data_section(self)
        self.tokenize_config()

    def tokenize_config(self) -> TokenizeConfig:
        return tokenize_config(self, step_separator=self.step_separator)


@dataclasses.dataclass(frozen=True)
class FilesOreoConfig(OreoConfig):
    """OREO's training hyper-parameters (`jaxalign.algorithms.oreo.OreoConfig`, Wang et al. 2024) and the cadence
    of the held-out evaluation.

    level: "token" | "step" | "response": the MDP's states in both losses (step: the first token of every step of
        the file, the default here; token: every response token; response: the state after the prompt only).
    beta: KL-penalty strength of the soft Bellman equation (paper: 0.03).
    alpha: weight of the full-vocabulary KL(pi_theta || pi_ref) in the policy loss; None = the paper's default for
        the level (0.01; 0.1 at step level).
    value_model: "critic" (a separate copy of the model with a zero scalar head, the paper's) or "shared" (a zero
        head on the policy trunk, trained on stop-gradient features).
    steps: optimizer steps (each one critic and one actor update).
    batch_size: trajectories per step.
    actor_optim: AdamW of the policy (`jaxalign.train.optim`).
    critic_optim: AdamW of the value model.
    eval_every: the held-out evaluation runs at step 0, every this many steps and after the last step."""

    eval_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"oreo.eval_every must be an integer >= 1, got {self.eval_every!r}")


# OREO for a user's model: step level (the file's steps are the states), small batches, the authors' beta and
# learning rates, 100 steps.
FILES_OREO = FilesOreoConfig(level="step", steps=100, batch_size=8,
                             actor_optim=OptimConfig(learning_rate=5e-5, warmup_steps=10),
                             critic_optim=OptimConfig(learning_rate=5e-4, warmup_steps=10))


@dataclasses.dataclass(frozen=True)
class OreoFilesConfig:
    """Everything `oreo_files` needs; every field can be overridden from the command line (key=value)."""

    seed: int = 0  # the held-out split, the batch order and the initialisation of new parameters (heads, LoRA)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    oreo: FilesOreoConfig = FILES_OREO
    lora: LoraSection = LoraSection()
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=50, keep_last=2)
    export: ExportSection = ExportSection()
    eval_batch_size: int = 32  # trajectories per forward pass of the held-out evaluation
    show_progress: bool = True  # a progress bar with rate and ETA on the terminal (never part of the result)
    log_every: int = 10  # metrics.jsonl gets a record every this many steps (and at the last one)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers.


def step_starts_from_ends(completion_mask: np.ndarray, step_end_mask: np.ndarray) -> np.ndarray:
    """Boolean [N, L]: the first token of every step, OREO's step-level states (Wang et al. 2024), from the
    tokenizer's step ends (1 on each step's last token): the first completion token, and every completion token
    right after a step's last one."""
    active = np.asarray(completion_mask) > 0
    after_end = np.zeros_like(active)
    after_end[:, 1:] = np.asarray(step_end_mask)[:, :-1] > 0
    first = active & (np.cumsum(active, axis=1) == 1)
    return active & (first | after_end)


def trajectory_arrays(arrays: dict) -> dict[str, np.ndarray]:
    """The tokenized file's arrays in `jaxalign.algorithms.oreo.trajectory_batch`'s layout."""
    return {"tokens": arrays["tokens"], "attention_mask": arrays["attention_mask"],
            "completion_mask": arrays["completion_mask"],
            "step_starts": step_starts_from_ends(arrays["completion_mask"], arrays["step_end_mask"]),
            "reward": np.asarray(arrays["reward"], np.float32)}


def take_rows(arrays: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given rows, the [N, L] arrays cut to the longest of them (no all-padding columns)."""
    width = max(int(np.max(np.nonzero(arrays["attention_mask"][rows].any(axis=0))[0])) + 1, 2)
    return {k: v[rows][:, :width] if v.ndim == 2 else v[rows] for k, v in arrays.items()}


def reward_midpoint(reward: np.ndarray) -> float:
    """c = (min R + max R) / 2: the threshold of the value accuracy (0.5 for 0/1 rewards, 0 for +-1)."""
    return float((np.min(reward) + np.max(reward)) / 2)


def value_accuracy(values: np.ndarray, reward: np.ndarray, midpoint: float) -> float:
    """Share of trajectories whose value and reward lie on the same side of `midpoint` (above it, or not)."""
    return float(np.mean((np.asarray(values) > midpoint) == (np.asarray(reward) > midpoint)))


def data_fingerprint(arrays: dict, batch_size: int, seed: int) -> str:
    """sha256 of everything that decides the batch sequence: resuming against other data is a checkpoint mismatch."""
    digest = hashlib.sha256(json.dumps({"batch_size": batch_size, "seed": seed, "keys": sorted(arrays)}).encode())
    for name in sorted(arrays):
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def check_first_rows(path: str, on_error: str) -> None:
    """Read the file up to its first valid trajectory row, so that a file of another format (or with a bad first
    row under on_error=fail) is refused before the work directory exists, with the pipeline's own message naming
    file, line and field. Under on_error=skip only a file without any valid row is refused here."""
    first = None
    for where, row in formats.read_rows(path):
        try:
            if isinstance(row, formats.RowError):
                raise row
            formats.validate_row("trajectory", row)
            return
        except formats.RowError as e:
            if on_error == "fail":
                raise formats.row_failure(path, where, e) from None
            first = first or (where, e)
    if first is None:
        raise ValueError(f"data.path={path!r} holds no rows")
    raise formats.DataFormatError(f"no row of {path} is a trajectory row {{prompt, steps, reward}} (every row was "
                                  f"skipped); the first: {formats.row_failure(path, *first)}")


def validate_config(cfg: OreoFilesConfig) -> None:
    """The checks that need the files (the config sections check their own values)."""
    if not cfg.model.path:
        raise ValueError("model.path is required: a Hugging Face checkpoint directory or a `jaxalign convert "
                         "hf-to-jaxalign` output")
    model_format(cfg.model.path)
    if not cfg.data.path:
        raise ValueError("data.path is required: a .jsonl or .parquet file of trajectories {prompt, steps, reward}")
    if not os.path.isfile(cfg.data.path):
        raise ValueError(f"data.path={cfg.data.path!r} does not exist")
    check_first_rows(cfg.data.path, cfg.data.on_error)


def model_header(cfg: OreoFilesConfig) -> tuple[int | None, str | None]:
    """(context length, Hugging Face family or None) from the model directory's config file alone, so that the
    checks that need them run before the work directory is claimed. A `jaxalign convert` config that cannot be read
    gives (None, None): loading the model reports it."""
    if model_format(cfg.model.path) == "hf":
        model_cfg, family = hf.read_hf_config(cfg.model.path)
        return model_cfg.max_len, family
    try:
        with open(os.path.join(cfg.model.path, hf.NATIVE_CONFIG), encoding="utf-8") as f:
            meta = json.load(f)
        return int(meta["model"]["max_len"]), meta.get("family")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def check_model(cfg: OreoFilesConfig, max_len: int | None, family: str | None) -> str | None:
    """Checks that need the model's config; returns the export family (None when not exporting)."""
    check_context(cfg, max_len)
    return export_family(cfg, family)


def load_trajectories(cfg: OreoFilesConfig, workdir: str, model_cfg: ModelConfig, tok):
    """(train arrays, held-out arrays, data report): the file validated, tokenized with `tok`, split."""
    from jaxalign.data.pipeline import prepare_dataset

    data_dir = cfg.data.dataset_dir or paths.join(workdir, "data")
    dataset, report = prepare_dataset("trajectory", cfg.data.path, data_dir, tok, cfg.data.tokenize_config(),
                                      on_error=cfg.data.on_error)
    top = int(np.max(dataset.arrays["tokens"]))
    if top >= model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_path(cfg)} produced token id {top}, but the model's vocabulary "
                         f"has {model_cfg.vocab_size} ids; model.tokenizer must be the model's own tokenizer")
    if len(dataset) < 2:
        raise ValueError(f"{cfg.data.path}: {len(dataset)} usable trajectories; at least 2 are needed (one to train "
                         f"on, one held out)")
    arrays = trajectory_arrays(dataset.arrays)
    train_rows, eval_rows = split_rows(len(dataset), cfg.data.eval_fraction, cfg.seed)
    train, held_out = take_rows(arrays, train_rows), take_rows(arrays, eval_rows)
    if len(train_rows) < cfg.oreo.batch_size:
        raise ValueError(f"{cfg.data.path}: {len(train_rows)} training trajectories (after holding out "
                         f"{len(eval_rows)}) are fewer than oreo.batch_size={cfg.oreo.batch_size}")
    report = dict(report, tokenizer=tokenizer_path(cfg), train_trajectories=len(train_rows),
                  eval_trajectories=len(eval_rows),
                  train_reward_mean=float(np.mean(train["reward"])),
                  eval_reward_mean=float(np.mean(held_out["reward"])),
                  steps_per_trajectory_mean=float(np.mean(arrays["step_starts"].sum(axis=1))))
    return train, held_out, report


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation.


@functools.partial(jax.jit, static_argnames=("value_model", "level", "beta", "alpha", "model_cfg"))
def heldout_terms(policy_params, critic_params, reference_params, batch, *, value_model: str, level: str,
                  beta: float, alpha: float, model_cfg: ModelConfig):
    """OREO's value loss, the policy loss's Bellman term and KL (and the token count the KL averages over), and V at
    each row's last state (before its final token), on one batch of trajectories (Wang et al. 2024)."""
    tokens, mask = batch["tokens"], batch["completion_mask"]
    ref = reference_logits(model_cfg, reference_params, batch)
    outputs, logits = value_forward(value_model, model_cfg, critic_params, policy_params, tokens,
                                    batch["attention_mask"])
    if logits is None:
        logits, _ = DecoderLM(model_cfg).apply({"params": policy_params}, tokens, batch["attention_mask"])
    logratio = masked_token_logprobs(logits, tokens, mask) - masked_token_logprobs(ref, tokens, mask)
    values = state_values(outputs, mask)
    states = state_mask(mask, level, batch["step_starts"] if level == "step" else None)
    value_loss, _ = oreo_value_loss(values, logratio, mask, states, batch["reward"], beta)
    _, policy = oreo_policy_loss(logratio, values, mask, states, batch["reward"], beta, alpha, token_kl(logits, ref),
                                 level)
    last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1]), 0), axis=1)
    return {"value_loss": value_loss, "bellman": policy["oreo/policy_bellman"], "kl": policy["oreo/kl"],
            "tokens": jnp.sum(mask), "value_last": jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]}


def heldout_metrics(policy_params, critic_params, reference_params, held_out: dict, *, cfg: OreoConfig,
                    model_cfg: ModelConfig, batch_size: int, midpoint: float) -> dict[str, float]:
    """The held-out metrics of the module docstring, step 5, over every held-out trajectory: the row-mean losses
    weighted by rows per chunk and the KL by tokens per chunk, so the result does not depend on `batch_size`."""
    n = len(held_out["reward"])
    rows, tokens, value_loss, bellman, kl, last = 0, 0, 0.0, 0.0, 0.0, []
    for start in range(0, n, batch_size):
        chunk = {k: jnp.asarray(v[start:start + batch_size]) for k, v in held_out.items()}
        out = jax.device_get(heldout_terms(policy_params, critic_params, reference_params, chunk,
                                           value_model=cfg.value_model, level=cfg.level, beta=cfg.beta,
                                           alpha=cfg.kl_weight, model_cfg=model_cfg))
        m, t = len(chunk["reward"]), int(out["tokens"])
        rows, tokens = rows + m, tokens + t
        value_loss += m * float(out["value_loss"])
        bellman += m * float(out["bellman"])
        kl += t * float(out["kl"])
        last.append(np.asarray(out["value_last"], np.float64))
    last, reward = np.concatenate(last), np.asarray(held_out["reward"], np.float64)
    bellman, kl = bellman / rows, kl / max(tokens, 1)
    return {"eval/value_loss": value_loss / rows, "eval/policy_loss": bellman + cfg.kl_weight * kl,
            "eval/policy_bellman": bellman, "eval/kl": kl,
            "eval/value_last_mse": float(np.mean((last - reward) ** 2)),
            "eval/value_last_accuracy": value_accuracy(last, reward, midpoint),
            "eval/value_last_mean": float(np.mean(last))}


# ---------------------------------------------------------------------------------------------------------------
# Training.


def initial_states(cfg: OreoFilesConfig, model_cfg: ModelConfig, base):
    """(actor state, critic state) as `oreo_arith` starts them (`init_oreo_states`): the actor from the loaded
    model, or under LoRA from fresh adapters (B = 0: the policy starts at the loaded model); the critic from the
    loaded model with a zero head ("critic") or a zero head on the policy trunk ("shared")."""
    # Jitted: initialising the critic's LM op by op only to replace its backbone costs more than the whole run.
    critic = jax.jit(init_critic_params, static_argnums=(0, 1))(cfg.oreo.value_model, model_cfg, base,
                                                                 jax.random.key(cfg.seed + 4))
    lora = cfg.lora.config()
    if lora is None:
        return init_oreo_states(cfg.oreo, model_cfg, base, jax.random.key(cfg.seed + 5), critic)
    abstract = jax.eval_shape(lambda key: init_params(model_cfg, key), jax.random.key(0))
    adapters = nn.meta.unbox(init_lora(abstract, lora, jax.random.key(cfg.seed + 3)))
    return init_oreo_states(cfg.oreo, model_cfg, adapters, jax.random.key(cfg.seed + 5), critic)


def steps_with_progress(steps, total: int, show_progress: bool):
    """`steps` whose update advances a progress bar (rate and ETA) when `show_progress`."""
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="oreo", unit="step", dynamic_ncols=True)

    def update(actor_state, critic_state, *args):
        if bar is not None and bar.n == 0:
            bar.update(int(jax.device_get(actor_state.step)))  # a resumed run starts where it stopped
        out = steps.update(actor_state, critic_state, *args)
        if bar is not None:
            bar.update(1)
            if bar.n >= total:
                bar.close()
        return out

    return steps._replace(update=update)


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """The steps after which the held-out evaluation runs (step 0 aside): every `eval_every`, and the last."""
    return list(range(eval_every, steps, eval_every)) + [steps]


def common_checkpoint_step(actor_ckpt, critic_ckpt) -> int:
    """The newest step both checkpointers hold (the step `train_oreo` resumes from), 0 if none."""
    common = set(actor_ckpt.all_steps()) & set(critic_ckpt.all_steps())
    return max(common, default=0)


def train_phase(cfg: OreoFilesConfig, model_cfg: ModelConfig, base, train: dict, workdir: str, log: MetricsLog,
                evaluate):
    """OREO from the loaded model on the training trajectories, checkpointed and resumed in WORKDIR/checkpoints,
    evaluated by `evaluate(policy, critic)` at step 0 (the loaded model and the initial critic), every
    `oreo.eval_every` steps and after the last step. `train_oreo` runs up to each evaluation step in turn (it
    restores both states from the checkpoint it saved there, so the segments make the same run as one call); the
    evaluation records go to metrics.jsonl (phase "oreo_eval"), and a resumed run reads back those of the steps it
    has. Returns (policy params: adapters merged under LoRA, actor state params, critic params, history)."""
    lora = cfg.lora.config()
    policy_of = (lambda params: params) if lora is None else (lambda params: merge_lora(base, params, lora))
    actor, critic = initial_states(cfg, model_cfg, base)
    steps = steps_with_progress(make_oreo_steps(cfg.oreo, model_cfg, lora), cfg.oreo.steps, cfg.show_progress)
    metadata = {"experiment": "oreo_files", "model": dataclasses.asdict(model_cfg),
                "oreo": dataclasses.asdict(cfg.oreo), "data": data_fingerprint(train, cfg.oreo.batch_size, cfg.seed),
                **({"lora": dataclasses.asdict(lora)} if lora is not None else {})}
    run_dir = RunDir(workdir)
    with Checkpointer(run_dir.checkpoints("oreo_actor"), cfg.checkpoint, {"phase": "oreo_actor", **metadata}) \
            as actor_ckpt, Checkpointer(run_dir.checkpoints("oreo_critic"), cfg.checkpoint,
                                        {"phase": "oreo_critic", **metadata}) as critic_ckpt:
        done = common_checkpoint_step(actor_ckpt, critic_ckpt)
        log.truncate("oreo_eval", done)
        history = [{k: v for k, v in r.items() if k != "phase"} for r in log.records("oreo_eval")]
        if not history or history[0]["step"] != 0:
            # LoRA's B = 0: the initial policy is the loaded model itself.
            history.insert(0, {"step": 0, **evaluate(base, critic.params)})
            log.write(dict(history[0], phase="oreo_eval"))
        for target in eval_steps(cfg.oreo.steps, cfg.oreo.eval_every):
            logged = any(r["step"] == target for r in history)
            if logged and target != cfg.oreo.steps:
                continue
            actor, critic, _ = train_oreo(actor, critic, base, ArrayDataset(train),
                                          cfg=dataclasses.replace(cfg.oreo, steps=target), model_cfg=model_cfg,
                                          seed=cfg.seed + 7, steps=steps, checkpointers=(actor_ckpt, critic_ckpt),
                                          metrics_log=log, log_every=cfg.log_every)
            if not logged:
                history.append({"step": target, **evaluate(policy_of(actor.params), critic.params)})
                log.write(dict(history[-1], phase="oreo_eval"))
    return policy_of(actor.params), actor.params, critic.params, history


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


def run(cfg: OreoFilesConfig, workdir: str) -> dict:
    """Run (or resume) OREO on `data.path` from `model.path` in `workdir`; returns and writes results.json."""
    clock = time.perf_counter()
    validate_config(cfg)
    # Everything that can fail from the inputs alone fails before the directory is claimed, so the corrected
    # command is not refused as another run.
    tok = load_tokenizer(cfg)
    check_model(cfg, *model_header(cfg))
    paths.makedirs(workdir)
    claim(cfg, workdir)
    base, model_cfg, family = load_model(cfg)
    family_out = check_model(cfg, model_cfg.max_len, family)
    train, held_out, data_report = load_trajectories(cfg, workdir, model_cfg, tok)
    log = MetricsLog(RunDir(workdir).metrics)
    midpoint = reward_midpoint(train["reward"])
    evaluate = functools.partial(heldout_metrics, reference_params=base, held_out=held_out, cfg=cfg.oreo,
                                 model_cfg=model_cfg, batch_size=cfg.eval_batch_size, midpoint=midpoint)
    policy, state_params, critic, history = train_phase(cfg, model_cfg, base, train, workdir, log, evaluate)
    before, after = history[0], history[-1]
    records = [r for r in log.records("oreo") if "oreo/value_loss" in r]
    results = {
        **{f"{k.split('/')[1]}_before": before[k] for k in EVAL_KEYS},
        **{f"{k.split('/')[1]}_after": after[k] for k in EVAL_KEYS},
        "eval_before": before, "eval_after": after, "eval_history": history,
        "value_accuracy_midpoint": midpoint,
        **({"train_value_loss_first_logged": records[0]["oreo/value_loss"],
            "train_value_loss_last": records[-1]["oreo/value_loss"],
            "train_policy_loss_first_logged": records[0]["oreo/policy_loss"],
            "train_policy_loss_last": records[-1]["oreo/policy_loss"]} if records else {}),
        "train_trajectories": data_report["train_trajectories"], "eval_trajectories": data_report["eval_trajectories"],
        **data_and_model_summary(cfg, data_report, base, state_params, family),
        "steps": cfg.oreo.steps,
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(policy),
        "critic_sha256": params_sha256(critic),
        "config": config_to_dict(cfg),
    }
    if family_out is not None:
        results["export"] = export_policy(policy, model_cfg, family_out, cfg, workdir, tok)
    if is_primary():
        write_json_atomic(RunDir(workdir).results, results)
        _plot(history, log.records("oreo"), RunDir(workdir).file("oreo_heldout.png"))
    return results


def _plot(history: list[dict], records: list[dict], path: str) -> None:
    """Training value and policy losses over steps with the held-out ones at every evaluation; the held-out value
    accuracy and last-state MSE at every evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_value) = plt.subplots(1, 2, figsize=(10, 3.5))
    logged = [r for r in records if "oreo/value_loss" in r]
    steps = [r["step"] for r in history]
    for key, name, color in (("value_loss", "value", "tab:blue"), ("policy_loss", "policy", "tab:orange")):
        if logged:
            ax_loss.plot([r["step"] for r in logged], [r[f"oreo/{key}"] for r in logged], color=color, alpha=0.5,
                         label=f"{name} loss (training)")
        ax_loss.plot(steps, [r[f"eval/{key}"] for r in history], color=color, marker="o", linestyle="--",
                     label=f"{name} loss (held-out)")
    ax_loss.set(xlabel="OREO step", ylabel="loss", title="OREO losses")
    ax_loss.legend(fontsize=8)
    ax_value.plot(steps, [r["eval/value_last_accuracy"] for r in history], marker="o", label="value accuracy")
    ax_value.plot(steps, [r["eval/value_last_mse"] for r in history], marker="o", label="last-state MSE")
    ax_value.set(xlabel="OREO step", title="held-out value model at the last state")
    ax_value.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)


__all__ = ["DataSection", "ExportSection", "FILES_OREO", "ModelSection", "OreoFilesConfig", "heldout_metrics",
           "run", "split_rows", "step_starts_from_ends", "trajectory_arrays"]
