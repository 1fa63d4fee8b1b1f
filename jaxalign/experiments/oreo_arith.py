"""OREO on ARITH (Wang et al. 2024, "Offline Reinforcement Learning for LLM Multi-Step Reasoning", arXiv:2412.16145;
docs/algorithms.md, "OREO"), end to end.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`): a policy that drops most carries under greedy decoding.
2. Offline trajectories: `base.pairs.samples_per_prompt` samples for each of `base.pairs.num_prompts` training
   prompts from the SFT policy at `base.pairs.temperature` (the main job's cached samples, samples.npz), graded by the
   oracle: R = arith.grade(...).correct in {0, 1}; reasoning steps are the ';'-separated parts.
3. OREO (`jaxalign.algorithms.oreo`): critic (a separate value LM from the SFT policy with a zero head, or a head on
   the policy trunk, `oreo.value_model`) and actor trained together, critic first, the SFT policy as reference;
   checkpoints/oreo_actor and checkpoints/oreo_critic. With `iterations` > 1 (iterative OREO), iteration i
   re-collects the trajectories with the current policy and trains actor and critic on in iterations/iter_<i>.
4. Held-out evaluation: greedy exact-match accuracy of SFT and OREO; on the first `num_beam_prompts` held-out
   problems, value-guided beam search (`beam.*`) with the OREO policy and critic against greedy decoding of the same
   policy.
5. Baselines at equal data (`compare_baselines`): rejection-sampling SFT on the correct trajectories and DPO on
   best-vs-worst pairs of the same samples, both from the SFT policy; results.json's "comparison" and "claim_holds".
6. The value checks of docs/algorithms.md, "OREO" on the first `num_value_prompts` held-out problems, each sampled
   `value_samples_per_prompt` times from the SFT policy (temperature 1): the correlation between V(s_0) and the
   SFT policy's empirical success rate on the prompt, and the mean change of V across the first wrong step of each
   trajectory (V after the step minus V before it; the same change across correct steps is the control).

Layout of the work directory: config.json, metrics.jsonl (SFT and OREO records), checkpoints/{sft, oreo_actor,
oreo_critic, rs_sft}, samples.npz, pairs.npz,
dpo/ (the DPO baseline), rs_sft_eval.json, dpo_eval.json, results.json, oreo_arith.png.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Any

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.oreo import (
    BeamConfig,
    OreoConfig,
    arith_trajectory_batch,
    critic_scorer,
    init_oreo_states,
    policy_step_sampler,
    prompt_state_values,
    train_oreo,
    value_guided_beam_search,
    value_outputs,
)
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import PROMPT_LEN, completion_budget
from jaxalign.models.llama import count_params
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.rundir import RunDir, config_to_dict, params_sha256


@dataclasses.dataclass(frozen=True)
class OreoArithConfig:
    """base: the main job's config (task, model, SFT, and in `base.pairs` the trajectory sampling: num_prompts,
    samples_per_prompt, temperature; its dpo section is unused).
    oreo: the OREO trainer (`OreoConfig`: level, beta, alpha, value model, steps, optimizers).
    beam: test-time value-guided beam search (`BeamConfig`).
    num_beam_prompts: held-out problems searched with beam search (it samples beams x candidates steps per step).
    num_value_prompts: held-out problems of the value checks (V(s_0) against the SFT policy's success rate).
    value_samples_per_prompt: SFT samples (temperature 1) per value-check problem: its empirical success rate.
    compare_baselines: also train, on the SAME trajectories from the same SFT policy, rejection-sampling SFT
        (`rs_sft`: token NLL on the correct trajectories only) and DPO (the main job's DPO phase, `base.dpo`, on
        each prompt's best-vs-worst pair of its trajectories), the paper's two baselines at equal data.
    iterations: iterative OREO; each iteration after the first re-collects the trajectories (same prompts and
        settings) with the policy the previous one trained and trains actor and critic on, from where they stood
        (the reference stays the SFT policy); the baselines always use the SFT trajectories.
    """

    base: kit.ArithDPOConfig = kit.ArithDPOConfig()
    # The actor learns at the rejection-sampling baseline's rate (2e-4): at OreoConfig's 5e-5 the 200 actor steps
    # leave OREO's greedy accuracy far below the baselines it is compared with (0.46 vs 0.62 on seed 0).
    oreo: OreoConfig = OreoConfig(actor_optim=OptimConfig(learning_rate=2e-4, warmup_steps=10))
    beam: BeamConfig = BeamConfig()
    num_beam_prompts: int = 256
    num_value_prompts: int = 128
    value_samples_per_prompt: int = 16
    compare_baselines: bool = True
    iterations: int = 1
    rs_sft: kit.SFTConfig = kit.SFTConfig(steps=200, batch_size=64,
                                                      optim=OptimConfig(learning_rate=2e-4, warmup_steps=10))

    def __post_init__(self):
        for name in ("num_beam_prompts", "num_value_prompts", "value_samples_per_prompt", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation pieces.


def beam_search_eval(cfg: OreoArithConfig, policy, critic, problems: np.ndarray) -> tuple[dict, np.ndarray]:
    """Accuracy of value-guided beam search with the OREO policy and critic on `problems` (in chunks of about
    base.eval_batch_size sampled rows); per-problem correctness."""
    base, tok = cfg.base, CharTokenizer()
    expand = policy_step_sampler(policy, base.model, separator=tuple(tok.encode(";")), eos_id=tok.EOS_ID,
                                 pad_id=tok.PAD_ID, max_step_tokens=cfg.beam.max_step_tokens,
                                 temperature=cfg.beam.temperature, num_tokens=tok.vocab_size)
    score = critic_scorer(cfg.oreo.value_model, base.model, critic, policy, eos_id=tok.EOS_ID)
    prompts, prompt_mask = arith.encode_prompts(tok, [arith.prompt_text(p) for p in problems], pad_to=PROMPT_LEN)
    chunk = max(1, base.eval_batch_size // (cfg.beam.beams * cfg.beam.num_candidates))
    rng, correct, lengths, finished = jax.random.key(base.seed + 23), [], [], []
    for start in range(0, len(problems), chunk):
        rng, sub = jax.random.split(rng)
        result = value_guided_beam_search(prompts[start:start + chunk], prompt_mask[start:start + chunk],
                                          expand=expand, score=score, config=cfg.beam,
                                          completion_len=completion_budget(base.model), eos_id=tok.EOS_ID,
                                          pad_id=tok.PAD_ID, rng=sub)
        correct += [arith.grade(p, tok.decode(t)).correct for p, t in zip(problems[start:start + chunk],
                                                                           result.tokens)]
        lengths.append(result.mask.sum(axis=1))
        finished.append(result.finished)
    correct = np.array(correct, bool)
    return {"accuracy": float(correct.mean()), "mean_length": float(np.concatenate(lengths).mean()),
            "finished_rate": float(np.concatenate(finished).mean())}, correct


def _first_wrong_step_changes(outputs: np.ndarray, batch: dict, grades: list[arith.Grade]):
    """(V after - V before the first wrong step, per trajectory that has one; the same across every correct step).

    V before step k = output at the token before its first token (the state the step starts from); V after = output
    at the step's last token other than EOS (the ';' closing it, or the token before EOS for the last step)."""
    wrong, right = [], []
    eos = CharTokenizer.EOS_ID
    for row, g in enumerate(grades):
        starts = np.nonzero(batch["step_starts"][row])[0]
        completion = np.nonzero(batch["completion_mask"][row])[0]
        if not len(starts):
            continue
        ends = list(starts[1:] - 1)
        last = completion[-1] - (batch["tokens"][row, completion[-1]] == eos)
        ends.append(last)
        for k, (start, end) in enumerate(zip(starts, ends)):
            if end < start or k > g.correct_steps:
                break  # an EOS-only step, or past the first wrong step
            change = float(outputs[row, end] - outputs[row, start - 1])
            if k < g.correct_steps:
                right.append(change)
            elif k < g.num_steps:  # the first wrong step of the chain (not a wrong recap)
                wrong.append(change)
    return np.array(wrong), np.array(right)


def value_checks(cfg: OreoArithConfig, sft_params, policy, critic, problems: np.ndarray) -> tuple[dict, dict]:
    """The value checks (docs/algorithms.md, "OREO") on `problems` (module docstring): V(s_0) against the SFT
    policy's sampled success rate per prompt, and the change of V across the first wrong step. Returns (report, per-prompt arrays
    for the plot)."""
    base, tok, k = cfg.base, CharTokenizer(), cfg.value_samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=completion_budget(base.model), temperature=1.0)
    repeated = np.repeat(problems, k, axis=0)
    prompt_tokens, completions, masks = kit.sample_completions(sft_params, base.model, repeated, sampling,
                                                                     jax.random.key(base.seed + 29),
                                                                     base.eval_batch_size)
    grades = kit.grade_completions(repeated, completions)
    success = np.array([g.correct for g in grades], np.float32).reshape(-1, k).mean(axis=1)
    prompts, prompt_mask = prompt_tokens[::k], (prompt_tokens[::k] != tok.PAD_ID).astype(np.int32)
    v0 = prompt_state_values(cfg.oreo.value_model, base.model, critic, policy, prompts, prompt_mask)
    batch = arith_trajectory_batch(repeated, prompt_tokens, completions, masks)
    outputs = np.concatenate([
        np.asarray(value_outputs(
            cfg.oreo.value_model, base.model, critic, policy, batch["tokens"][i:i + base.eval_batch_size],
            batch["attention_mask"][i:i + base.eval_batch_size])[0])
        for i in range(0, len(repeated), base.eval_batch_size)])
    wrong, right = _first_wrong_step_changes(outputs, batch, grades)
    varied = np.std(success) > 0 and np.std(v0) > 0
    report = {
        "value_s0_success_correlation": float(np.corrcoef(v0, success)[0, 1]) if varied else None,
        "value_s0_mean_abs_error": float(np.mean(np.abs(v0 - success))),
        "value_s0_mean": float(v0.mean()),
        "sft_sampled_success_mean": float(success.mean()),
        "value_change_at_first_wrong_step": float(wrong.mean()) if len(wrong) else None,
        "value_change_at_correct_steps": float(right.mean()) if len(right) else None,
        "first_wrong_steps": int(len(wrong)),
        "correct_steps_measured": int(len(right)),
        "num_value_prompts": int(len(problems)),
    }
    return report, {"v0": v0, "success": success}


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


def train_phase(cfg: OreoArithConfig, sft_params, data: ArrayDataset, workdir: str, log: MetricsLog,
                start: tuple[Any, Any] | None = None):
    """Phase 3: (policy params, critic params, last logged OREO metrics); resumes from / restores its checkpoints in
    workdir/checkpoints. The actor starts from `start`'s policy (default: the SFT policy) and the critic from its
    critic (default: a fresh one); the reference is always the SFT policy."""
    base = cfg.base
    if cfg.oreo.batch_size > len(data):
        raise ValueError(f"oreo.batch_size={cfg.oreo.batch_size} is larger than the {len(data)} trajectories "
                         f"(base.pairs.num_prompts x base.pairs.samples_per_prompt)")
    policy, critic_params = start or (sft_params, None)
    actor, critic = init_oreo_states(cfg.oreo, base.model, policy, jax.random.key(base.seed + 5), critic_params)
    metadata = {"model": dataclasses.asdict(base.model), "oreo": dataclasses.asdict(cfg.oreo)}
    directory = paths.join(workdir, "checkpoints")
    with Checkpointer(paths.join(directory, "oreo_actor"), base.checkpoint, {"phase": "oreo_actor", **metadata}) \
            as actor_ckpt, Checkpointer(paths.join(directory, "oreo_critic"), base.checkpoint,
                                        {"phase": "oreo_critic", **metadata}) as critic_ckpt:
        actor, critic, _ = train_oreo(actor, critic, sft_params, data, cfg=cfg.oreo, model_cfg=base.model,
                                      seed=base.seed + 7, checkpointers=(actor_ckpt, critic_ckpt), metrics_log=log,
                                      log_every=base.log_every)
    records = log.records("oreo")
    return actor.params, critic.params, (records[-1] if records else {})


def trajectories(cfg: OreoArithConfig, policy, problems, directory: str) -> ArrayDataset:
    """`base.pairs.samples_per_prompt` graded trajectories of `policy` for each of `base.pairs.num_prompts` training
    prompts (`kit.on_policy_samples`, cached in directory/samples.npz), R = exactly correct."""
    base = cfg.base
    chosen, prompt_tokens, completions, masks = kit.on_policy_samples(base, policy, problems.train, directory)
    k = base.pairs.samples_per_prompt
    return ArrayDataset(arith_trajectory_batch(np.repeat(chosen, k, axis=0), np.repeat(prompt_tokens, k, axis=0),
                                               completions, masks))


def rejection_sampling_dataset(data: ArrayDataset) -> ArrayDataset:
    """The correct trajectories (reward 1) as SFT sequences: rejection-sampling fine-tuning's data."""
    keep = np.flatnonzero(data.arrays["reward"] > 0)
    if not len(keep):
        raise ValueError("rejection-sampling SFT: none of the trajectories is correct (reward 1); sample more "
                         "(base.pairs.num_prompts, base.pairs.samples_per_prompt)")
    return ArrayDataset({k: data.arrays[k][keep] for k in ("tokens", "attention_mask", "completion_mask")})


def baselines(cfg: OreoArithConfig, mesh, sft_params, data: ArrayDataset, problems, workdir: str,
              log: MetricsLog) -> dict:
    """RS-SFT and DPO at equal data (`compare_baselines`): {name: held-out greedy evaluation record}."""
    base, out = cfg.base, {}
    rs_data = rejection_sampling_dataset(data)
    if len(rs_data) < cfg.rs_sft.batch_size:
        raise ValueError(f"rejection-sampling SFT: only {len(rs_data)} of {len(data)} trajectories are correct, fewer "
                         f"than rs_sft.batch_size={cfg.rs_sft.batch_size}; sample more or lower the batch size")
    rs_params, _ = kit.train_supervised(base, cfg.rs_sft, mesh, rs_data, workdir, log, params=sft_params,
                                              phase="rs_sft")
    out["rs_sft"] = kit.cached_greedy_eval(rs_params, base, problems.test,
                                                 RunDir(workdir).file("rs_sft_eval.json"),
                                                 {"sequences": int(len(rs_data))})
    pairs, pair_stats = kit.on_policy_pairs(base, sft_params, problems.train, workdir)  # the same samples.npz
    dpo_dir = paths.join(workdir, "dpo")
    dpo_params, _, _ = kit.train_dpo(base, mesh, sft_params, pairs, problems, dpo_dir,
                                           MetricsLog(RunDir(dpo_dir).metrics))
    out["dpo"] = kit.cached_greedy_eval(dpo_params, base, problems.test, RunDir(workdir).file("dpo_eval.json"),
                                              {"pairs": pair_stats["pairs"]})
    return out


def run(cfg: OreoArithConfig, workdir: str) -> dict:
    """Run (or resume) OREO on ARITH in `workdir`; returns and writes results.json (module docstring)."""
    clock = time.perf_counter()
    base = cfg.base
    start = kit.start_experiment(cfg, base, workdir)
    mesh, problems, log, sft_params = start.mesh, start.problems, start.log, start.sft_params
    data = trajectories(cfg, sft_params, problems, workdir)
    policy, critic, last_metrics = train_phase(cfg, sft_params, data, workdir, log)
    success_per_iteration = [float(data.arrays["reward"].mean())]
    for iteration in range(1, cfg.iterations):  # iterative OREO: re-collect with the new policy, train on
        it_dir = paths.join(workdir, "iterations", f"iter_{iteration}")
        it_data = trajectories(cfg, policy, problems, it_dir)
        policy, critic, last_metrics = train_phase(cfg, sft_params, it_data, it_dir,
                                                   MetricsLog(RunDir(it_dir).metrics), (policy, critic))
        success_per_iteration.append(float(it_data.arrays["reward"].mean()))

    sft_eval, _ = kit.greedy_eval(sft_params, base.model, problems.test, base.eval_batch_size)
    oreo_eval, oreo_correct = kit.greedy_eval(policy, base.model, problems.test, base.eval_batch_size)
    searched = problems.test[: cfg.num_beam_prompts]
    beam_eval, _ = beam_search_eval(cfg, policy, critic, searched)
    checks, per_prompt = value_checks(cfg, sft_params, policy, critic, problems.test[: cfg.num_value_prompts])
    reward = data.arrays["reward"]
    baseline = (baselines(cfg, mesh, sft_params, data, problems, workdir, log)
                if cfg.compare_baselines else {})
    comparison = {"sft": {"accuracy": sft_eval["accuracy"]}, "oreo": {"accuracy": oreo_eval["accuracy"]},
                  **{name: {"accuracy": record["test_accuracy"]} for name, record in baseline.items()},
                  "oreo_beam": {"accuracy": beam_eval["accuracy"], "prompts": int(len(searched))},
                  "oreo_greedy_same_prompts": {"accuracy": float(oreo_correct[: len(searched)].mean())}}
    results = {
        "comparison": comparison,
        "claim": "OREO beats rejection-sampling SFT and DPO trained on the same trajectories (held-out greedy "
                 "accuracy), and value-guided beam search adds accuracy on top of greedy decoding",
        "claim_holds": bool(baseline) and all(comparison["oreo"]["accuracy"] > comparison[name]["accuracy"]
                                              for name in baseline)
                       and comparison["oreo_beam"]["accuracy"] > comparison["oreo_greedy_same_prompts"]["accuracy"],
        "sft_accuracy": sft_eval["accuracy"],
        "oreo_accuracy": oreo_eval["accuracy"],
        "sft_mean_length": sft_eval["mean_length"],
        "oreo_mean_length": oreo_eval["mean_length"],
        "beam_accuracy": beam_eval["accuracy"],
        "beam_greedy_accuracy": float(oreo_correct[: len(searched)].mean()),  # greedy, same policy and prompts
        "beam_mean_length": beam_eval["mean_length"],
        "beam_finished_rate": beam_eval["finished_rate"],
        "num_beam_prompts": int(len(searched)),
        **checks,
        "trajectories": int(len(reward)),
        "trajectory_success_rate": float(reward.mean()),
        "trajectory_success_rate_per_iteration": success_per_iteration,
        "oreo_last_metrics": last_metrics,
        "carry_share": arith.carry_share(base.task.num_operands),
        "num_test_prompts": int(len(problems.test)),
        "steps": {"sft": base.sft.steps, "oreo": cfg.oreo.steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(policy),
        "critic_sha256": params_sha256(critic),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: _plot(results, per_prompt, path),
                                       "oreo_arith.png")


def _plot(results: dict, per_prompt: dict, path: str) -> None:
    """Held-out accuracy (SFT greedy, OREO greedy, greedy vs beam search on the searched prompts) and V(s_0) against
    the SFT policy's sampled success rate per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_value) = plt.subplots(1, 2, figsize=(10, 3.5))
    comparison = results["comparison"]
    bars = [("SFT", "sft", "tab:gray"), ("RS-SFT", "rs_sft", "tab:orange"), ("DPO", "dpo", "tab:red"),
            ("OREO", "oreo", "tab:blue"),
            (f"OREO greedy\n({results['num_beam_prompts']})", "oreo_greedy_same_prompts", "tab:blue"),
            (f"OREO beam\n({results['num_beam_prompts']})", "oreo_beam", "tab:green")]
    bars = [bar for bar in bars if bar[1] in comparison]
    ax_acc.bar(range(len(bars)), [comparison[key]["accuracy"] for _, key, _ in bars], color=[c for *_, c in bars])
    ax_acc.set_xticks(range(len(bars)), [label for label, *_ in bars], fontsize=8)
    ax_acc.set(ylabel="held-out accuracy", title="OREO on ARITH", ylim=(0, 1))
    ax_value.scatter(per_prompt["success"], per_prompt["v0"], s=12, alpha=0.6)
    ax_value.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    corr = results["value_s0_success_correlation"]
    ax_value.set(xlabel="SFT sampled success rate", ylabel="V(s_0)",
                 title="V(s_0) vs success" + ("" if corr is None else f" (r = {corr:.2f})"))
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
