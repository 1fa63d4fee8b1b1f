"""Diffusion preference fine-tuning on the exact 2-D Gaussian mixture: every objective from the same base model, the
same preference pairs and the same budget (`jaxalign run diffusion_preference --workdir DIR [key=value ...]`).

This is the VECTOR version of the diffusion issue's item 5: the points of `gmm.mixture_2d()` stand in for the
issue's 16x16 shapes images, `VectorDenoiser` (an MLP) for the UNet. Nothing here is an image model.

Per seed s of `seeds`:

1. Base: the `diffusion_gmm` base model (`diffusion_kit.diffusion_trainer`, config `base.*`), trained on the RL
   harness in DIR/base/seed_<s>/ with the key diffusion_gmm uses for seed s (so it is diffusion_gmm's trained
   network for `seed=s` and the same `base.*`); `base.seed` and the base's evaluation fields (nfes, solvers,
   samples) are not used.
2. Pairs: 2 * `pairs` samples of the base (`solver` at `nfe` evaluations from exact x_T ~ p_T; prompt-free: a pair
   is two independent samples), scored by the programmatic reward r(x) = x[0] + x[1] (it prefers the mixture's
   upper-right components: means (1, 1) and (0, 1.5) score 2 and 1.5, (1.5, -1) 0.5, (-1.5, -1) -2.5). The higher
   reward is the winner; pairs with |r_a - r_b| <= `tie_margin` are ties, dropped and counted.
3. Fine-tuning, from the base parameters, `steps` Adam steps (constant `lr`), `batch` pairs per step drawn with
   replacement from the kept pairs, the SAME pair indices, t and eps at every step for every objective (common
   random numbers). Each pair gets ONE t ~ U(t_min, t_max) and ONE eps shared by winner and loser and by policy and
   frozen reference (Diffusion-DPO's recipe); the per-sample error is e = mean over the 2 coordinates of
   (eps_theta(x_t, t) - eps)^2 (`jaxalign.diffusion.preference`'s convention). Objectives
   (`jaxalign.diffusion.preference`):
   - sft: the denoising loss on the winners only (mean e_theta(w)), the baseline;
   - diffusion_dpo (beta_dpo), dso_dpo (beta_dso; the same function as diffusion_dpo, only beta differs), smpo
     (beta_smpo, p = `smoothed_preference(r_w, r_l, scale)` with scale = max - min of the pairs' rewards, as the
     SmPO authors normalise PickScore), diffusion_dro (its hinge, margin_dro; here w and l are both offline base
     samples, not an expert image and an online policy sample as in the paper);
   - dso_dro (unpaired): the 2 * batch samples of the step's pairs, desirable = reward above the median reward of
     all kept pairs' samples, with the reference term;
   - d3po (beta_d3po, clip_d3po): its data are trajectories, so it has its OWN pairs (`d3po_pairs`): per pair one
     x_T and two stochastic DDIM (eta_d3po = 1) trajectories of the base from it, `nfe` steps each, labelled by the
     reward of their ends with the same tie rule, as many pairs as the others; every step k of the batch's pairs is
     a D3PO pair of actions, log N(x_{k+1}; mu_theta(x_k), c_k^2 I) under policy and frozen reference
     (`stochastic_ddim_plan`, `step_logprobs`). Same base, steps, batch (pairs) and lr; not the same pairs.
4. Evaluation: `eval_samples` samples of each fine-tuned model and of the base from one shared x_T (same solver and
   NFE): mean reward, reward gain (minus the base's), squared MMD (bandwidth 0.5) to base samples drawn from an
   INDEPENDENT x_T (the distance to the base model; the base's own value is the estimator's floor, ~0), and squared
   MMD to the exact mixture (`gmm.mmd2_to_mixture`).

Hyper-parameters: the papers' betas (5000 for Stable Diffusion in Diffusion-DPO, 500 in DSO, 50000 in SmPO's form)
are not meaningful here: beta multiplies a difference of denoising errors, whose scale depends on the model, the
data and the error's normalisation (here a mean over 2 coordinates of a toy MLP, there over a 4x64x64 latent of a
UNet). The defaults were CHOSEN by a sweep on seed 0 with the default base and budget (beta_dpo 50, 500, 5000, the
other betas in the papers' ratios diffusion_dpo : dso_dpo : smpo = 1 : 1/10 : 10): at 50 and 500 Diffusion-DPO
pushes the samples past the mixture's best mode (mean reward 4.1 and 2.1 > 2, MMD^2 to the base 0.61 and 0.26), at
5000 it gains ~1.2 reward at MMD^2 ~0.07 (SFT on winners: ~1.0 at ~0.05); that 5000 is also Diffusion-DPO's SD value
is a coincidence of scale, not a transfer. At beta 5000 the Diffusion-DPO and SmPO losses on each step's fresh
(t, eps) draws end far above log 2 (~6 and ~10): the implicit rewards are dominated by the noise of one (t, eps) per
pair at this beta, yet the mean reward rises. The papers' ratios are kept, so dso_dpo (beta 500) is Diffusion-DPO at
a 10x smaller beta. The fine-tuning lr (3e-4) and steps (400) were not swept. All values are recorded in
config.json and results.json. dso_dro's loss is linear and unbounded below (its reference term is a constant for
the gradient, and there is no sigmoid): at this budget it diverges (non-finite samples), which results.json reports
as "diverged" instead of numbers.

Writes: config.json; base/seed_<s>/ (the base's harness run: checkpoints, metrics.jsonl); units/seed_<s>/<name>.npz
(one per (seed, objective) and per seed's base evaluation: the evaluation samples and their statistics, written
atomically); results.json (per objective: reward, reward gain, MMD^2 to the base and to the mixture, mean, sample
std (ddof 1) over seeds and per seed; the pair counts; a markdown table; wall time); samples.png (the first seed's
base and fine-tuned samples, coloured by reward).

Resume: a unit whose .npz exists is not redone (results.json counts "units_skipped" and "units_run"); a seed whose
units all exist does not even restore its base; a base killed mid-training resumes from its newest chunk (the
harness). A unit killed mid-fine-tuning is redone from the base (fine-tuning is not checkpointed).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxalign import paths
from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.preference import diffusion_objective, smoothed_preference
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.experiments.diffusion_kit import (BANDWIDTH, T_END, DiffusionGMMConfig, diffusion_trainer,
                                                make_network, mmd2_between)
from jaxalign.rundir import RunDir, claim, load_arrays, params_sha256, save_arrays
from rl import harness

OBJECTIVES = ("sft", "diffusion_dpo", "smpo", "dso_dpo", "dso_dro", "diffusion_dro", "d3po")
NOT_DONE: dict[str, str] = {}  # objectives of the issue not run here (none left; kept for results.json)
REWARD = "x[0] + x[1]"


def reward(x):
    """The programmatic reward r(x) = x[0] + x[1] of points x [n, 2]: [n]."""
    return x[..., 0] + x[..., 1]


def _base_default() -> DiffusionGMMConfig:
    return DiffusionGMMConfig(steps=3000, batch=256, num_chunks=3)


@dataclasses.dataclass(frozen=True)
class DiffusionPreferenceConfig:
    seeds: str = "0,1,2"  # comma-separated seeds: each trains its own base, pairs, fine-tunings and evaluation
    base: DiffusionGMMConfig = dataclasses.field(default_factory=_base_default)  # the base model (training fields)
    objectives: str = ",".join(OBJECTIVES)  # comma-separated, from OBJECTIVES
    pairs: int = 2000  # preference pairs sampled from the base (before dropping ties)
    tie_margin: float = 0.05  # |r_a - r_b| <= tie_margin is a tie: dropped, counted
    solver: str = "ddim"  # sampler of the pairs and the evaluation (samplers.ORDERS)
    nfe: int = 20  # its model evaluations
    steps: int = 400  # fine-tuning Adam steps, the same for every objective
    batch: int = 128  # pairs per fine-tuning step
    lr: float = 3e-4  # constant Adam learning rate of the fine-tuning
    beta_dpo: float = 5000.0  # diffusion_dpo's beta (chosen by a sweep here: module docstring)
    beta_dso: float = 500.0  # dso_dpo's beta (DSO's default is 1/10 of Diffusion-DPO's)
    beta_smpo: float = 50000.0  # smpo's beta (its form folds in a factor 10: 10 x beta_dpo)
    margin_dro: float = 0.001  # diffusion_dro's hinge margin (the authors' default)
    beta_d3po: float = 0.1  # d3po's beta (the authors' default: per-step log-ratios, no scale to transfer)
    clip_d3po: float = 0.1  # d3po's ratio clip (the authors' train.eps)
    eta_d3po: float = 1.0  # d3po's stochastic DDIM eta (> 0: its per-step transitions need a density)
    eval_samples: int = 2000  # samples per model for the reward and the MMDs
    num_chunks: int = 4  # jitted scans per fine-tuning (progress and ETA after each; <= steps)
    show_progress: bool = True  # progress bars with rate and ETA (never part of the result)

    def __post_init__(self):
        for key in ("pairs", "steps", "batch", "nfe"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {key}={getattr(self, key)!r}")
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be at least 2 (the MMD's U-statistic), got "
                             f"eval_samples={self.eval_samples!r}")
        for key in ("lr", "beta_dpo", "beta_dso", "beta_smpo", "beta_d3po"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {key}={getattr(self, key)!r}")
        if not 0 < self.clip_d3po < 1:
            raise ValueError(f"clip_d3po must lie in (0, 1), got clip_d3po={self.clip_d3po!r}")
        if not 0 < self.eta_d3po <= 1:
            raise ValueError(f"eta_d3po must lie in (0, 1], got eta_d3po={self.eta_d3po!r}")
        if not self.margin_dro >= 0:
            raise ValueError(f"margin_dro must be >= 0, got margin_dro={self.margin_dro!r}")
        if not self.tie_margin >= 0:
            raise ValueError(f"tie_margin must be >= 0, got tie_margin={self.tie_margin!r}")
        if not 1 <= self.num_chunks <= self.steps:
            raise ValueError(f"num_chunks must lie in [1, steps={self.steps}], got num_chunks={self.num_chunks!r}")
        try:
            seeds = self.seed_list
        except ValueError:
            raise ValueError(f"seeds must be comma-separated integers, got seeds={self.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct comma-separated integers, got seeds={self.seeds!r}")
        names = self.objective_names
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"objectives must be distinct comma-separated names from {OBJECTIVES}, got "
                             f"objectives={self.objectives!r}")
        if self.solver not in samplers.ORDERS:
            raise ValueError(f"solver must be one of {sorted(samplers.ORDERS)}, got solver={self.solver!r}")
        need = 2 if self.solver == "dpm_solver_pp_2m" else samplers.ORDERS[self.solver]
        if self.nfe < need:
            raise ValueError(f"{self.solver} needs nfe >= {need}, got nfe={self.nfe!r}")

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.seeds.split(","))

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.objectives.split(",") if s.strip())


# ------------------------------------------------------------------------------------------------------------------
# pieces


def make_sampler(base: DiffusionGMMConfig, schedule, solver: str, nfe: int):
    """A jitted (params, x_T) -> samples: `solver` at `nfe` evaluations with the network's parameters as an argument
    (one compilation for every fine-tuned model)."""
    apply_fn = make_network(base, schedule).apply
    ts, kwargs = samplers.plan(solver, schedule, nfe, t_end=T_END)

    @jax.jit
    def draw(params, x_T):
        return samplers.SOLVERS[solver](networks.model_fn(apply_fn, params), schedule, x_T, ts, **kwargs)

    return draw


def label_pairs(xs_a, xs_b, tie_margin: float) -> dict[str, np.ndarray]:
    """Winner / loser by reward, ties (|r_a - r_b| <= tie_margin) marked not kept: arrays x_w, x_l [n, 2], r_w, r_l,
    kept [n] bool."""
    r_a, r_b = np.asarray(reward(xs_a)), np.asarray(reward(xs_b))
    a_wins = (r_a >= r_b)[:, None]
    x_w, x_l = np.where(a_wins, xs_a, xs_b), np.where(a_wins, xs_b, xs_a)
    r_w, r_l = np.maximum(r_a, r_b), np.minimum(r_a, r_b)
    return {"x_w": x_w, "x_l": x_l, "r_w": r_w, "r_l": r_l, "kept": (r_w - r_l) > tie_margin}


def stochastic_ddim_plan(schedule, nfe: int, eta: float) -> dict[str, np.ndarray]:
    """The `nfe` steps s -> t (uniform in log-SNR, T to T_END) of stochastic DDIM (Song et al. 2021, DDIM, eq. 12
    and 16, in VP continuous time): x_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z, x0_hat = (x_s -
    sigma_s eps_hat) / alpha_s, c = eta (sigma_t / sigma_s) sqrt(1 - alpha_s^2 / alpha_t^2); as x_t = ratio x_s +
    eps_coef eps_hat + c z. Arrays [nfe] of s, ratio, eps_coef, c (float64 arithmetic, float32 out)."""
    ts = samplers.make_timesteps(schedule, nfe, "logsnr", t_end=T_END)
    with jax.default_device(jax.devices("cpu")[0]), jax.enable_x64(True):
        t64 = jnp.asarray(ts, jnp.float64)
        alpha, sigma = np.asarray(schedule.alpha(t64)), np.asarray(schedule.sigma(t64))
    a_s, s_s, a_t, s_t = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    c = eta * (s_t / s_s) * np.sqrt(1.0 - (a_s / a_t) ** 2)
    out = {"s": ts[:-1], "ratio": a_t / a_s, "eps_coef": np.sqrt(s_t**2 - c**2) - a_t * s_s / a_s, "c": c}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def make_trajectory_sampler(apply_fn, plan: dict):
    """A jitted (params, x_T [n, d], key) -> the stochastic DDIM trajectory [n, steps + 1, d] (x_T first)."""
    coefs = tuple(jnp.asarray(plan[k]) for k in ("s", "ratio", "eps_coef", "c"))

    @jax.jit
    def draw(params, x_T, key):
        def step(x, inputs):
            s, ratio, eps_coef, c, k = inputs
            eps = apply_fn(params, x, jnp.full(x.shape[:1], s))
            x = ratio * x + eps_coef * eps + c * jax.random.normal(k, x.shape, x.dtype)
            return x, x

        _, xs = jax.lax.scan(step, x_T, (*coefs, jax.random.split(key, coefs[0].shape[0])))
        return jnp.concatenate([x_T[:, None], jnp.swapaxes(xs, 0, 1)], axis=1)

    return draw


def step_logprobs(apply_fn, params, plan: dict, trajectories):
    """log N(x_{k+1}; mu_theta(x_k), c_k^2 I) of each step of trajectories [b, steps + 1, d], up to the constant
    -d log(c_k sqrt(2 pi)) (the same under every parameters, so it cancels in D3PO's log-ratios): [b, steps]."""
    b, k1, d = trajectories.shape
    x_k, x_next = trajectories[:, :-1], trajectories[:, 1:]
    eps = apply_fn(params, x_k.reshape(-1, d), jnp.tile(jnp.asarray(plan["s"]), b)).reshape(b, k1 - 1, d)
    mean = jnp.asarray(plan["ratio"])[:, None] * x_k + jnp.asarray(plan["eps_coef"])[:, None] * eps
    return -jnp.sum((x_next - mean) ** 2, -1) / (2.0 * jnp.asarray(plan["c"]) ** 2)


def objective_loss(name: str, cfg: DiffusionPreferenceConfig):
    """(errors, batch extras) -> (loss, metrics) for objective `name`; errors = (policy_w, policy_l, ref_w, ref_l)."""
    if name == "sft":
        return lambda errors, extra: (jnp.mean(errors[0]), {})
    if name == "dso_dro":
        fn = diffusion_objective("dso_dro")
        return lambda errors, extra: fn(policy_error=jnp.concatenate(errors[:2]),
                                        reference_error=jnp.concatenate(errors[2:]),
                                        desirable=jnp.concatenate([extra["desirable_w"], extra["desirable_l"]]))
    hyper = {"diffusion_dpo": {"beta": cfg.beta_dpo}, "dso_dpo": {"beta": cfg.beta_dso},
             "smpo": {"beta": cfg.beta_smpo}, "diffusion_dro": {"margin": cfg.margin_dro}}[name]
    fn = diffusion_objective(name, **hyper)

    def loss(errors, extra):
        kwargs = dict(policy_error_w=errors[0], policy_error_l=errors[1], reference_error_w=errors[2],
                      reference_error_l=errors[3])
        if name == "smpo":
            kwargs["preference"] = extra["preference"]
        return fn(**kwargs)

    return loss


def make_finetune(name: str, cfg: DiffusionPreferenceConfig, schedule, apply_fn, optimizer):
    """A jitted (state, data, ref_params, length) -> (state, losses): `length` fine-tuning steps of objective `name`;
    state {params, opt_state, step}; the step's draws come from fold_in(data["key"], step), the same for every
    objective."""
    t_min = cfg.base.t_min
    if name == "d3po":
        plan = stochastic_ddim_plan(schedule, cfg.nfe, cfg.eta_d3po)
        d3po = diffusion_objective("d3po", beta=cfg.beta_d3po, clip_eps=cfg.clip_d3po)
    else:
        loss_of = objective_loss(name, cfg)

    def errors_of(params, x_w, x_l, t, eps):
        alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        e_w = jnp.mean((apply_fn(params, alpha * x_w + sigma * eps, t) - eps) ** 2, -1)
        e_l = jnp.mean((apply_fn(params, alpha * x_l + sigma * eps, t) - eps) ** 2, -1)
        return e_w, e_l

    def update(state, data, ref_params):
        k_idx, k_noise = jax.random.split(jax.random.fold_in(data["key"], state["step"]))
        n = data["kept"].shape[0]
        idx = jax.random.choice(k_idx, n, (cfg.batch,), p=data["kept"] / jnp.sum(data["kept"]))
        if name == "d3po":  # every step of the stored trajectories of the batch's pairs
            traj_w, traj_l = data["traj_w"][idx], data["traj_l"][idx]
            ref_w, ref_l = jax.lax.stop_gradient((step_logprobs(apply_fn, ref_params, plan, traj_w),
                                                  step_logprobs(apply_fn, ref_params, plan, traj_l)))

            def loss_fn(params):
                return d3po(policy_logp_w=step_logprobs(apply_fn, params, plan, traj_w),
                            policy_logp_l=step_logprobs(apply_fn, params, plan, traj_l),
                            reference_logp_w=ref_w, reference_logp_l=ref_l)
        else:
            x_w, x_l = data["x_w"][idx], data["x_l"][idx]
            t, eps = networks.noise_draws(schedule, x_w, k_noise, t_min)  # one t and one eps per pair, shared
            ref_w, ref_l = jax.lax.stop_gradient(errors_of(ref_params, x_w, x_l, t, eps))
            extra = {k: data[k][idx] for k in ("preference", "desirable_w", "desirable_l")}

            def loss_fn(params):
                e_w, e_l = errors_of(params, x_w, x_l, t, eps)
                return loss_of((e_w, e_l, ref_w, ref_l), extra)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}, loss)

    def chunk(state, data, ref_params, length):
        return jax.lax.scan(lambda s, _: update(s, data, ref_params), state, None, length=length)

    return jax.jit(chunk, static_argnames=("length",))


def d3po_pairs(cfg: DiffusionPreferenceConfig, seed: int, schedule, mix, base_params, key) -> tuple[dict, dict]:
    """D3PO's own pairs (its data are trajectories, not points): per pair one exact x_T ~ p_T and two stochastic
    DDIM (eta_d3po) trajectories of the base from it, `nfe` steps each (D3PO's setting: both samples from the same
    x_T), labelled by the reward of their ends with the same tie rule; the same number of pairs as the others.
    (data dict for `make_finetune("d3po", ...)`, counts)."""
    apply_fn = make_network(cfg.base, schedule).apply
    draw = make_trajectory_sampler(apply_fn, stochastic_ddim_plan(schedule, cfg.nfe, cfg.eta_d3po))
    k_T, k_a, k_b = jax.random.split(jax.random.fold_in(jax.random.key(seed), 2), 3)
    x_T = gmm.sample_marginal(mix, schedule, k_T, cfg.pairs, schedule.t_max)
    traj_a, traj_b = np.asarray(draw(base_params, x_T, k_a)), np.asarray(draw(base_params, x_T, k_b))
    labelled = label_pairs(traj_a[:, -1], traj_b[:, -1], cfg.tie_margin)
    a_wins = (reward(traj_a[:, -1]) >= reward(traj_b[:, -1]))[:, None, None]
    kept = labelled["kept"]
    if not kept.any():
        raise ValueError(f"seed {seed}: every d3po pair is a tie at tie_margin={cfg.tie_margin}; lower it")
    data = {"key": key, "kept": jnp.asarray(kept, jnp.float32),
            "traj_w": jnp.asarray(np.where(a_wins, traj_a, traj_b)),
            "traj_l": jnp.asarray(np.where(a_wins, traj_b, traj_a))}
    return data, {"pairs": cfg.pairs, "kept": int(kept.sum()), "ties": int((~kept).sum()),
                  "mean_reward_gap": float(np.mean(labelled["r_w"][kept] - labelled["r_l"][kept]))}


def _stats(values: list) -> dict:
    """mean, sample std (ddof 1; 0 for one seed) and the per-seed values; mean and std None when a seed diverged
    (its value None), with the count of diverged seeds."""
    diverged = sum(v is None for v in values)
    if diverged:
        return {"mean": None, "std": None, "per_seed": [None if v is None else float(v) for v in values],
                "diverged_seeds": diverged}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "per_seed": [float(v) for v in arr], "diverged_seeds": 0}


# ------------------------------------------------------------------------------------------------------------------
# one seed


def _unit_path(workdir: str, seed: int, name: str) -> str:
    return RunDir(workdir).file(paths.join("units", f"seed_{seed}", f"{name}.npz"))


def run_seed(cfg: DiffusionPreferenceConfig, workdir: str, seed: int, schedule, mix, finetunes: dict,
             draw) -> tuple[dict, int, int]:
    """({unit name: (samples, stats)}, units run, units skipped) for one seed (module docstring)."""
    names = ("base",) + cfg.objective_names
    units = {name: load_arrays(_unit_path(workdir, seed, name)) for name in names}
    skipped = sum(u is not None for u in units.values())
    if skipped == len(names):
        return {name: (u[0]["samples"], u[1]) for name, u in units.items()}, 0, skipped

    # the base: diffusion_gmm's key for this seed (its first split)
    base_cfg = dataclasses.replace(cfg.base, seed=seed, show_progress=cfg.show_progress)
    k_base = jax.random.split(jax.random.key(seed), 5)[0]
    trained = harness.train(diffusion_trainer(base_cfg, schedule, mix), base_cfg,
                            RunDir(workdir).file(paths.join("base", f"seed_{seed}")), k_base, base_cfg.num_chunks,
                            show_progress=cfg.show_progress, desc=f"base seed {seed}")
    base_params = trained.state["params"]
    k_pairs, k_ft, k_eval, k_ref = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), 4)

    x_T = gmm.sample_marginal(mix, schedule, k_pairs, 2 * cfg.pairs, schedule.t_max)
    xs = np.asarray(draw(base_params, x_T))
    pairs = label_pairs(xs[:cfg.pairs], xs[cfg.pairs:], cfg.tie_margin)
    kept = pairs["kept"]
    if not kept.any():
        raise ValueError(f"seed {seed}: every pair is a tie at tie_margin={cfg.tie_margin}; lower it")
    rewards_kept = np.concatenate([pairs["r_w"][kept], pairs["r_l"][kept]])
    scale = float(rewards_kept.max() - rewards_kept.min()) or 1.0
    median = float(np.median(rewards_kept))
    data = {"key": k_ft, "kept": jnp.asarray(kept, jnp.float32), "x_w": jnp.asarray(pairs["x_w"]),
            "x_l": jnp.asarray(pairs["x_l"]),
            "preference": smoothed_preference(pairs["r_w"], pairs["r_l"], scale).astype(jnp.float32),
            "desirable_w": jnp.asarray(pairs["r_w"] > median, jnp.float32),
            "desirable_l": jnp.asarray(pairs["r_l"] > median, jnp.float32)}
    pair_stats = {"pairs": cfg.pairs, "kept": int(kept.sum()), "ties": int((~kept).sum()),
                  "smpo_scale": scale, "dso_dro_median": median,
                  "mean_reward_gap": float(np.mean(pairs["r_w"][kept] - pairs["r_l"][kept]))}

    if "d3po" in cfg.objective_names and units["d3po"] is None:
        d3po_data, d3po_counts = d3po_pairs(cfg, seed, schedule, mix, base_params, k_ft)
    x_eval = gmm.sample_marginal(mix, schedule, k_eval, cfg.eval_samples, schedule.t_max)
    x_ref = gmm.sample_marginal(mix, schedule, k_ref, cfg.eval_samples, schedule.t_max)
    reference_samples = draw(base_params, x_ref)  # independent base samples: the distance to the base

    def evaluate(params) -> tuple[np.ndarray, dict]:
        samples = draw(params, x_eval)
        finite = float(np.mean(np.isfinite(np.asarray(samples)).all(-1)))
        if finite < 1.0:  # a diverged fine-tuning (dso_dro's linear loss is unbounded below): no statistics
            return np.asarray(samples), {"params_sha256": params_sha256(params), "diverged": True,
                                         "finite_fraction": finite, "reward": None, "mmd2_to_base": None,
                                         "mmd2_to_mixture": None}
        return np.asarray(samples), {
            "params_sha256": params_sha256(params),
            "diverged": False,
            "reward": float(jnp.mean(reward(samples))),
            "mmd2_to_base": float(mmd2_between(samples, reference_samples, BANDWIDTH)),
            "mmd2_to_mixture": float(gmm.mmd2_to_mixture(samples, mix, BANDWIDTH)),
        }

    ran = 0
    if units["base"] is None:
        samples, stats = evaluate(base_params)
        save_arrays(_unit_path(workdir, seed, "base"), {"samples": samples}, {**stats, **pair_stats})
        units["base"] = ({"samples": samples}, {**stats, **pair_stats})
        ran += 1
    optimizer = optax.adam(cfg.lr)  # the optimiser the fine-tunings were built with (stateless: an equal one)
    sizes = harness.chunk_sizes(cfg.steps, cfg.num_chunks)
    for name in cfg.objective_names:
        if units[name] is not None:
            continue
        clock = time.perf_counter()
        state = {"params": base_params, "opt_state": optimizer.init(base_params), "step": jnp.zeros((), jnp.int32)}
        losses = []
        with tqdm(total=cfg.steps, desc=f"seed {seed} {name}", unit="step", disable=not cfg.show_progress,
                  dynamic_ncols=True) as bar:
            for size in sizes:
                state, chunk_losses = finetunes[name](state, d3po_data if name == "d3po" else data, base_params,
                                                      length=size)
                chunk_losses = np.asarray(chunk_losses)
                losses.extend(chunk_losses.tolist())
                bar.set_postfix(loss=f"{chunk_losses[-20:].mean():.4g}")
                bar.update(size)
                if not np.all(np.isfinite(chunk_losses)):
                    break  # diverged: evaluated (and reported) as such, the run goes on
        samples, stats = evaluate(state["params"])
        tail = max(1, len(losses) // 10)
        nonfinite = np.flatnonzero(~np.isfinite(losses))
        stats.update(first_loss=losses[0] if np.isfinite(losses[0]) else None,
                     final_loss=None if nonfinite.size else float(np.mean(losses[-tail:])),
                     first_nonfinite_loss_step=int(nonfinite[0]) + 1 if nonfinite.size else None,
                     seconds=time.perf_counter() - clock)
        stats["diverged"] = stats["diverged"] or bool(nonfinite.size)
        if name == "d3po":
            stats["d3po_pairs"] = d3po_counts  # its own pairs (d3po_pairs), made only when its unit runs
        save_arrays(_unit_path(workdir, seed, name), {"samples": samples}, stats)
        units[name] = ({"samples": samples}, stats)
        ran += 1
    return {name: (u[0]["samples"], u[1]) for name, u in units.items()}, ran, skipped


# ------------------------------------------------------------------------------------------------------------------
# the run


def format_table(rows: dict) -> str:
    lines = ["| model | reward | reward gain | MMD^2 to base | MMD^2 to mixture |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        if row["reward"]["diverged_seeds"]:
            seeds = len(row["reward"]["per_seed"])
            lines.append(f"| {name} | " + " | ".join([f"diverged ({row['reward']['diverged_seeds']}/{seeds} seeds: "
                                                      "non-finite samples)"] + [""] * 3) + " |")
            continue
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("reward", "reward_gain")]
        cells += [f"{row[k]['mean']:.2e} ± {row[k]['std']:.1e}" for k in ("mmd2_to_base", "mmd2_to_mixture")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_grid(workdir: str, seed: int, mix, drawn: dict) -> None:
    if jax.process_index() != 0:
        return
    from matplotlib.figure import Figure

    names = list(drawn)
    cols = 4
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, sharex=True, sharey=True))
    everything = np.concatenate([xs[np.isfinite(xs).all(-1)] for xs, _ in drawn.values()])
    low = np.minimum(np.percentile(everything, 0.5, axis=0), [-3.5, -2.5])  # the mixture's box, widened to show
    high = np.maximum(np.percentile(everything, 99.5, axis=0), [3.5, 3.0])  # where fine-tuning moved the samples
    scatter = None
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, names):
        xs, stats = drawn[name]
        if stats.get("diverged"):
            ax.set_title(f"{name}\ndiverged (non-finite samples)", fontsize=8)
            ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]))
            continue
        scatter = ax.scatter(xs[:, 0], xs[:, 1], s=2, c=np.asarray(reward(xs)), cmap="viridis", vmin=-4, vmax=4)
        title = f"{name}\nreward {stats['reward']:.2f}"
        title += f", MMD² base {stats['mmd2_to_base']:.1e}" if name != "base" else " (before)"
        ax.set_title(title, fontsize=8)
        ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]))
        ax.set_aspect("equal")
    fig.colorbar(scatter, ax=axes, shrink=0.6, label=f"reward {REWARD}")
    fig.suptitle(f"seed {seed}: base samples (before) and after each objective's fine-tuning")
    paths.save_figure(fig, RunDir(workdir).file("samples.png"), dpi=110)


def run(cfg: DiffusionPreferenceConfig, workdir: str) -> dict:
    """Run (or resume) every (seed, objective) unit and write results.json and samples.png (module docstring)."""
    clock = time.perf_counter()
    schedule, mix = get_schedule(cfg.base.schedule), gmm.mixture_2d()
    paths.makedirs(RunDir(workdir).root)
    claim(cfg, workdir)
    apply_fn = make_network(cfg.base, schedule).apply
    optimizer = optax.adam(cfg.lr)
    finetunes = {name: make_finetune(name, cfg, schedule, apply_fn, optimizer) for name in cfg.objective_names}
    draw = make_sampler(cfg.base, schedule, cfg.solver, cfg.nfe)

    per_seed, ran, skipped = {}, 0, 0
    for seed in cfg.seed_list:
        per_seed[seed], r, s = run_seed(cfg, workdir, seed, schedule, mix, finetunes, draw)
        ran, skipped = ran + r, skipped + s

    def column(name, key):
        return [per_seed[s][name][1][key] for s in cfg.seed_list]

    base_reward = column("base", "reward")
    rows = {}
    for name in ("base",) + cfg.objective_names:
        rewards = column(name, "reward")
        gains = [None if r is None else r - b for r, b in zip(rewards, base_reward)]
        rows[name] = {"reward": _stats(rewards), "reward_gain": _stats(gains),
                      "mmd2_to_base": _stats(column(name, "mmd2_to_base")),
                      "mmd2_to_mixture": _stats(column(name, "mmd2_to_mixture"))}
        if name != "base":
            rows[name]["final_loss"] = _stats(column(name, "final_loss"))
            rows[name]["first_loss"] = _stats(column(name, "first_loss"))
    first = cfg.seed_list[0]
    plot_grid(workdir, first, mix, per_seed[first])
    results = {
        "objectives": rows,
        "table": format_table(rows),
        "reward": REWARD,
        "pairs": {str(s): {k: v for k, v in per_seed[s]["base"][1].items()
                           if k not in ("reward", "mmd2_to_base", "mmd2_to_mixture", "params_sha256", "diverged")}
                  for s in cfg.seed_list},
        "d3po_pairs": ({str(s): per_seed[s]["d3po"][1]["d3po_pairs"] for s in cfg.seed_list}
                       if "d3po" in cfg.objective_names else None),
        "not_done": NOT_DONE,
        "seeds": list(cfg.seed_list),
        "units_run": ran,
        "units_skipped": skipped,
        "mmd_bandwidth": BANDWIDTH,
        "wall_seconds": time.perf_counter() - clock,
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    return results


__all__ = ["DiffusionPreferenceConfig", "NOT_DONE", "OBJECTIVES", "label_pairs", "reward", "run"]
