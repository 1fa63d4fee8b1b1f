"""Diffusion preference fine-tuning: every objective from the same base model, the same preference pairs and the
same budget (`jaxalign run diffusion_preference --workdir DIR [key=value ...]`), on one of two tasks (`task`):

- "shapes" (the default; fields `shapes.*`): the diffusion issue's item 5 on images. 16x16 RGB procedural shapes
  (`jaxalign.diffusion.shapes`), a small UNet (`jaxalign.diffusion.unet`), a reward read from the pixels.
- "vectors" (the fields at the top level): the same design on the exact 2-D Gaussian mixture with an MLP, nothing
  an image model; `task=vectors` is exactly the run this experiment did before the shapes task existed.

THE SHAPES TASK. Per seed s of `seeds`:

1. Base: `diffusion_kit.shapes.shapes_trainer` (config `shapes.base.*`: a UNet of ~68k parameters, channels 8, 16,
   16 at 16x16, 8x8, 4x4, trained on fresh procedural images with `networks.denoising_loss`, Adam, cosine lr), on the
   RL harness in DIR/base/seed_<s>/ (checkpointed chunks, bit-identical resume, metrics.jsonl), key split(key(s))[0].
2. Pairs: 2 * `pairs` samples of the base (`solver` at `nfe` evaluations from x_T ~ N(0, I), with the data
   prediction clipped to [-1, 1] at each step: `diffusion_kit.shapes.clipped_apply`), a pair = two independent
   samples, scored by the programmatic reward r(x) = mean over pixels of (clip(R) - clip(B)) / 2 (+area/256 for a
   red shape, -area/256 for a blue one, 0 for green or background: it prefers LARGE RED shapes; the uniform data
   score 0 on average). The higher reward wins; |r_a - r_b| <= `tie_margin` is a tie, dropped and counted.
3. Fine-tuning, from the base parameters, `steps` Adam steps (constant `lr`) of `batch` pairs drawn with
   replacement from the kept pairs, the SAME pair indices, t and eps at every step for every objective. One t and
   one eps per pair, shared by winner, loser, policy and frozen reference; the error of an image is the mean over
   its 768 elements of (eps_theta - eps)^2, and per patch (`patch` x `patch` pixels, 16 patches at 4) the mean over
   the patch's elements. Objectives (`jaxalign.diffusion.preference`; hyper-parameters as the vector task's):
   - sft (denoising loss on the winners), diffusion_dpo, dso_dpo, smpo, diffusion_dro, dso_dro: as in the vector
     task below, on the image errors;
   - patch_dpo (PatchDPO's reference-free weighted denoising loss): both images weighted by their own per-patch
     quality, the patch's reward score mapped to [0, 1] ((s_p + 1) / 2: red 1, black 1/2, blue 0; `patch_quality`);
   - patch_weighted_dpo (Diffusion-DPO on patch-weighted errors, beta_dpo): one weight map per pair, the patches where
     the winner's and the loser's scores differ, P |s_p(w) - s_p(l)| / sum_q |...| (`patch_difference_weights`);
   - d3po: its own pairs (two stochastic DDIM trajectories of the base from one x_T, labelled by their ends), ONE
     uniformly drawn step per pair per update (an unbiased estimate of its mean over steps at the others' cost);
   - dense_dpo is not run (SHAPES_NOT_DONE says why).
   Every objective but d3po runs in one compiled program (the objective a traced `lax.switch` index).
4. Evaluation: `eval_samples` samples of each model from one shared x_T (same solver, NFE and clipping): mean reward,
   reward gain (minus the base's), squared MMD to base samples from an INDEPENDENT x_T (the distance to the base; the
   base's own value is the estimator's floor, ~0) and to rendered data, Gaussian kernel on the 768 pixel values,
   bandwidth 14 (`diffusion_kit.shapes.MMD_BANDWIDTH`: the median heuristic on rendered shapes).

Shapes hyper-parameters: the betas are the vector task's (5000, 500, 50000: Diffusion-DPO's SD value and the
papers' ratios), NOT swept for images; the per-image error is a mean over 768 elements, so its noise across (t, eps)
draws is smaller than the vector task's mean over 2, and the same beta acts more strongly. Sizes (base 800 steps of
32 images, 256 pairs, 60 fine-tuning steps of 16 pairs, lr 5e-4, 256 evaluation samples, DDIM NFE 10) were chosen
so that 3 seeds run in minutes on 2 CPU cores, not for sample quality: the base draws noisy colour fields with a
dominant palette colour, not crisp shapes (samples.png). The reward reads R - B and ignores G, so on generated
pixels orange and yellow (R high, B low) score like red: the pairwise objectives at these betas fill the whole image
with them (reward ~0.6-0.75, above the best data image's 121/256 = 0.47), which the MMD^2 to the data shows.

Writes (both tasks): config.json; base/seed_<s>/ (the base's harness run); units/seed_<s>/<name>.npz (one per (seed,
objective) and per seed's base: evaluation samples and statistics, written atomically); results.json (mean, sample
std (ddof 1) over seeds and per-seed values of each statistic, pair counts, a markdown table, wall time);
samples.png (shapes: one row per model, the same x_T per column; vectors: scatter plots). Resume: as below.

THE VECTOR TASK. Per seed s of `seeds`:

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
from jaxalign.diffusion import gmm, networks, samplers, shapes
from jaxalign.diffusion.preference import diffusion_objective, smoothed_preference
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.experiments.diffusion_kit import (BANDWIDTH, T_END, DiffusionGMMConfig, diffusion_trainer,
                                                make_network, mmd2_between)
from jaxalign.experiments.diffusion_kit.shapes import (MMD_BANDWIDTH, ShapesBaseConfig, make_image_sampler,
                                                       make_unet, mmd2_images, shapes_trainer)
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


SHAPES_OBJECTIVES = ("sft", "diffusion_dpo", "smpo", "dso_dpo", "dso_dro", "diffusion_dro", "d3po", "patch_dpo",
                     "patch_weighted_dpo")
SHAPES_NOT_DONE = {
    "dense_dpo": "its segments are aligned in time across two videos denoised from corrupted copies of ONE video; "
                 "the shapes pairs are two independent samples, so patch p of the winner and patch p of the loser "
                 "show different content and a per-patch label would compare unaligned regions (the patch "
                 "objectives use patches as weights within each image instead)",
}
TASKS = ("shapes", "vectors")


def _shapes_base_default() -> ShapesBaseConfig:
    return ShapesBaseConfig(steps=800, batch=32, num_chunks=4)


def check_fine_tuning_fields(cfg, objectives: tuple[str, ...]) -> None:
    """The checks both tasks' configs share: sizes, evaluation samples, learning rate, the objectives'
    hyper-parameters, the chunks, the objective names (from `objectives`), the solver and its NFE (one ValueError
    naming the field and its value)."""
    for key in ("pairs", "steps", "batch", "nfe"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be a positive integer, got {key}={getattr(cfg, key)!r}")
    if cfg.eval_samples < 2:
        raise ValueError(f"eval_samples must be at least 2 (the MMD's U-statistic), got "
                         f"eval_samples={cfg.eval_samples!r}")
    for key in ("lr", "beta_dpo", "beta_dso", "beta_smpo", "beta_d3po"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key} must be positive, got {key}={getattr(cfg, key)!r}")
    if not 0 < cfg.clip_d3po < 1:
        raise ValueError(f"clip_d3po must lie in (0, 1), got clip_d3po={cfg.clip_d3po!r}")
    if not 0 < cfg.eta_d3po <= 1:
        raise ValueError(f"eta_d3po must lie in (0, 1], got eta_d3po={cfg.eta_d3po!r}")
    if not cfg.margin_dro >= 0:
        raise ValueError(f"margin_dro must be >= 0, got margin_dro={cfg.margin_dro!r}")
    if not cfg.tie_margin >= 0:
        raise ValueError(f"tie_margin must be >= 0, got tie_margin={cfg.tie_margin!r}")
    if not 1 <= cfg.num_chunks <= cfg.steps:
        raise ValueError(f"num_chunks must lie in [1, steps={cfg.steps}], got num_chunks={cfg.num_chunks!r}")
    names = cfg.objective_names
    if any(n not in objectives for n in names) or not names or len(set(names)) != len(names):
        raise ValueError(f"objectives must be distinct comma-separated names from {objectives}, got "
                         f"objectives={cfg.objectives!r}")
    if cfg.solver not in samplers.ORDERS:
        raise ValueError(f"solver must be one of {sorted(samplers.ORDERS)}, got solver={cfg.solver!r}")
    need = 2 if cfg.solver == "dpm_solver_pp_2m" else samplers.ORDERS[cfg.solver]
    if cfg.nfe < need:
        raise ValueError(f"{cfg.solver} needs nfe >= {need}, got nfe={cfg.nfe!r}")


@dataclasses.dataclass(frozen=True)
class ShapesPreferenceConfig:
    base: ShapesBaseConfig = dataclasses.field(default_factory=_shapes_base_default)  # the UNet base model
    objectives: str = ",".join(SHAPES_OBJECTIVES)  # comma-separated, from SHAPES_OBJECTIVES
    pairs: int = 256  # preference pairs sampled from the base (before dropping ties)
    tie_margin: float = 0.01  # |r_a - r_b| <= tie_margin is a tie (0.01: 2.56 pixels of a red or blue shape)
    solver: str = "ddim"  # sampler of the pairs and the evaluation (samplers.ORDERS)
    nfe: int = 10  # its model evaluations
    steps: int = 60  # fine-tuning Adam steps, the same for every objective
    batch: int = 16  # pairs per fine-tuning step
    lr: float = 5e-4  # constant Adam learning rate of the fine-tuning
    beta_dpo: float = 5000.0  # diffusion_dpo's and patch_weighted_dpo's beta (module docstring)
    beta_dso: float = 500.0  # dso_dpo's beta (DSO's default is 1/10 of Diffusion-DPO's)
    beta_smpo: float = 50000.0  # smpo's beta (its form folds in a factor 10: 10 x beta_dpo)
    margin_dro: float = 0.001  # diffusion_dro's hinge margin (the authors' default)
    beta_d3po: float = 0.1  # d3po's beta (the authors' default)
    clip_d3po: float = 0.1  # d3po's ratio clip (the authors' train.eps)
    eta_d3po: float = 1.0  # d3po's stochastic DDIM eta (> 0: its per-step transitions need a density)
    patch: int = 4  # patch side in pixels for patch_dpo / patch_weighted_dpo (16 / patch squared patches)
    eval_samples: int = 256  # samples per model for the reward and the MMDs
    num_chunks: int = 2  # jitted scans per fine-tuning (progress and ETA after each; <= steps)

    def __post_init__(self):
        check_fine_tuning_fields(self, SHAPES_OBJECTIVES)
        if self.patch < 1 or shapes.SIZE % self.patch:
            raise ValueError(f"patch must be a positive divisor of {shapes.SIZE}, got patch={self.patch!r}")

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.objectives.split(",") if s.strip())


@dataclasses.dataclass(frozen=True)
class DiffusionPreferenceConfig:
    task: str = "shapes"  # "shapes" (16x16 images, UNet, fields shapes.*) or "vectors" (2-D mixture, the fields below)
    seeds: str = "0,1,2"  # comma-separated seeds: each trains its own base, pairs, fine-tunings and evaluation
    shapes: ShapesPreferenceConfig = dataclasses.field(default_factory=ShapesPreferenceConfig)  # the shapes task
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
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got task={self.task!r}")
        check_fine_tuning_fields(self, OBJECTIVES)
        try:
            seeds = self.seed_list
        except ValueError:
            raise ValueError(f"seeds must be comma-separated integers, got seeds={self.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct comma-separated integers, got seeds={self.seeds!r}")

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
    data, scale, median = preference_data(pairs, k_ft, cfg.tie_margin, f"seed {seed}: ")
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
        pairs = d3po_data if name == "d3po" else data
        state, losses = fine_tune_in_chunks(
            lambda st, n, f=finetunes[name], pairs=pairs: f(st, pairs, base_params, length=n), state, sizes,
            f"seed {seed} {name}", cfg.show_progress)
        samples, stats = evaluate(state["params"])
        stats = _fine_tuning_stats(stats, losses, time.perf_counter() - clock)
        if name == "d3po":
            stats["d3po_pairs"] = d3po_counts  # its own pairs, made only when its unit runs
        save_arrays(_unit_path(workdir, seed, name), {"samples": samples}, stats)
        units[name] = ({"samples": samples}, stats)
        ran += 1
    return {name: (u[0]["samples"], u[1]) for name, u in units.items()}, ran, skipped


# ------------------------------------------------------------------------------------------------------------------
# the run


def preference_data(pairs: dict, key, tie_margin: float, where: str = "") -> tuple[dict, float, float]:
    """(data, scale, median) from labelled pairs: the winners, losers and kept mask every objective reads, SmPO's
    smoothed preference (its reward scale: max - min of the kept pairs' rewards) and DSO-DRO's desirable flags
    (reward above the kept rewards' median). Every pair a tie is one clear error (`where` prefixes it)."""
    kept = pairs["kept"]
    if not kept.any():
        raise ValueError(f"{where}every pair is a tie at tie_margin={tie_margin}; lower it")
    rewards_kept = np.concatenate([pairs["r_w"][kept], pairs["r_l"][kept]])
    scale = float(rewards_kept.max() - rewards_kept.min()) or 1.0
    median = float(np.median(rewards_kept))
    data = {"key": key, "kept": jnp.asarray(kept, jnp.float32), "x_w": jnp.asarray(pairs["x_w"]),
            "x_l": jnp.asarray(pairs["x_l"]),
            "preference": smoothed_preference(pairs["r_w"], pairs["r_l"], scale).astype(jnp.float32),
            "desirable_w": jnp.asarray(pairs["r_w"] > median, jnp.float32),
            "desirable_l": jnp.asarray(pairs["r_l"] > median, jnp.float32)}
    return data, scale, median


def fine_tune_in_chunks(run_chunk, state, sizes, desc: str, show_progress: bool):
    """(state, per-step losses) of `run_chunk(state, length) -> (state, losses)` over the chunk `sizes`, with a
    progress bar (rate, ETA, recent loss); stops after the first chunk with a non-finite loss (the unit is then
    evaluated and reported as diverged, and the run goes on)."""
    losses = []
    with tqdm(total=sum(sizes), desc=desc, unit="step", disable=not show_progress, dynamic_ncols=True) as bar:
        for size in sizes:
            state, chunk_losses = run_chunk(state, size)
            chunk_losses = np.asarray(chunk_losses)
            losses.extend(chunk_losses.tolist())
            bar.set_postfix(loss=f"{chunk_losses[-20:].mean():.4g}")
            bar.update(size)
            if not np.all(np.isfinite(chunk_losses)):
                break
    return state, losses


def _fine_tuning_stats(stats: dict, losses: list, seconds: float) -> dict:
    """A unit's evaluation statistics plus its loss trace's summary: the first loss, the mean of the last tenth
    (None after a non-finite loss), the step of the first non-finite loss, the seconds; a non-finite loss marks the
    unit diverged."""
    tail = max(1, len(losses) // 10)
    nonfinite = np.flatnonzero(~np.isfinite(losses))
    stats.update(first_loss=losses[0] if np.isfinite(losses[0]) else None,
                 final_loss=None if nonfinite.size else float(np.mean(losses[-tail:])),
                 first_nonfinite_loss_step=int(nonfinite[0]) + 1 if nonfinite.size else None,
                 seconds=seconds)
    stats["diverged"] = stats["diverged"] or bool(nonfinite.size)
    return stats


def objective_rows(per_seed: dict, seeds, names, distance: str, extra: tuple[str, ...] = ()) -> dict:
    """results.json's per-model statistics over seeds: reward, reward gain over the same seed's base, MMD^2 to the
    base and `distance` (to the target), and for fine-tuned models the first and final loss and `extra` keys."""
    def column(name, key):
        return [per_seed[s][name][1][key] for s in seeds]

    base_reward = column("base", "reward")
    rows = {}
    for name in ("base",) + tuple(names):
        rewards = column(name, "reward")
        gains = [None if r is None else r - b for r, b in zip(rewards, base_reward)]
        rows[name] = {"reward": _stats(rewards), "reward_gain": _stats(gains),
                      "mmd2_to_base": _stats(column(name, "mmd2_to_base")),
                      distance: _stats(column(name, distance))}
        if name != "base":
            for key in ("final_loss", "first_loss") + extra:
                rows[name][key] = _stats(column(name, key))
    return rows


def results_record(cfg, per_seed: dict, rows: dict, table: str, reward: str, names, base_keys, not_done,
                   units: tuple[int, int], bandwidth: float, clock: float) -> dict:
    """results.json of either task: the rows and their table, the reward, each seed's pair statistics (the base
    unit's statistics other than `base_keys`), D3PO's own pair counts, what is not done, the units run and skipped,
    the MMD bandwidth, the wall time since `clock`, the device and the config."""
    return {
        "objectives": rows,
        "table": table,
        "reward": reward,
        "pairs": {str(s): {k: v for k, v in per_seed[s]["base"][1].items() if k not in base_keys}
                  for s in cfg.seed_list},
        "d3po_pairs": ({str(s): per_seed[s]["d3po"][1]["d3po_pairs"] for s in cfg.seed_list}
                       if "d3po" in names else None),
        "not_done": not_done,
        "seeds": list(cfg.seed_list),
        "units_run": units[0],
        "units_skipped": units[1],
        "mmd_bandwidth": bandwidth,
        "wall_seconds": time.perf_counter() - clock,
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }


def format_table(rows: dict, distance: str = "mmd2_to_mixture", label: str = "MMD^2 to mixture") -> str:
    """The markdown results table; the last column is the distance `distance` to the target (the mixture for the
    vector task, rendered data for the shapes)."""
    lines = ["| model | reward | reward gain | MMD^2 to base | " + label + " |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        if row["reward"]["diverged_seeds"]:
            seeds = len(row["reward"]["per_seed"])
            lines.append(f"| {name} | " + " | ".join([f"diverged ({row['reward']['diverged_seeds']}/{seeds} seeds: "
                                                      "non-finite samples)"] + [""] * 3) + " |")
            continue
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("reward", "reward_gain")]
        cells += [f"{row[k]['mean']:.2e} ± {row[k]['std']:.1e}" for k in ("mmd2_to_base", distance)]
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
    """Run (or resume) the configured task's every (seed, objective) unit; write results.json and samples.png."""
    return run_vectors(cfg, workdir) if cfg.task == "vectors" else run_shapes(cfg, workdir)


def run_vectors(cfg: DiffusionPreferenceConfig, workdir: str) -> dict:
    """The vector task (module docstring): every (seed, objective) unit, results.json and samples.png."""
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

    rows = objective_rows(per_seed, cfg.seed_list, cfg.objective_names, "mmd2_to_mixture")
    first = cfg.seed_list[0]
    plot_grid(workdir, first, mix, per_seed[first])
    results = results_record(cfg, per_seed, rows, format_table(rows), REWARD, cfg.objective_names,
                             ("reward", "mmd2_to_base", "mmd2_to_mixture", "params_sha256", "diverged"), NOT_DONE,
                             (ran, skipped), BANDWIDTH, clock)
    harness.write_results(workdir, results)
    return results


# ------------------------------------------------------------------------------------------------------------------
# the shapes task


def label_image_pairs(xs_a, xs_b, tie_margin: float) -> dict[str, np.ndarray]:
    """Winner / loser by `shapes.reward`, ties (|r_a - r_b| <= tie_margin) marked not kept: x_w, x_l [n, 16, 16, 3],
    r_w, r_l, kept [n] bool."""
    r_a, r_b = np.asarray(shapes.reward(xs_a)), np.asarray(shapes.reward(xs_b))
    a_wins = (r_a >= r_b)[:, None, None, None]
    x_w, x_l = np.where(a_wins, xs_a, xs_b), np.where(a_wins, xs_b, xs_a)
    r_w, r_l = np.maximum(r_a, r_b), np.minimum(r_a, r_b)
    return {"x_w": x_w, "x_l": x_l, "r_w": r_w, "r_l": r_l, "kept": (r_w - r_l) > tie_margin}


def patch_quality(images, patch: int) -> np.ndarray:
    """patch_dpo's weights: each patch's reward score mapped from [-1, 1] to [0, 1], (s_p + 1) / 2 (red 1, black
    0.5, blue 0): each image is reconstructed where it is good, as PatchDPO weights a generated image by its
    patch-quality map. [n, patches]."""
    return 0.5 * (np.asarray(shapes.patch_scores(images, patch)) + 1.0)


def patch_difference_weights(x_w, x_l, patch: int) -> np.ndarray:
    """patch_weighted_dpo's weights, one set per pair for both images: a_p = P |s_p(w) - s_p(l)| / sum_q |s_q(w) -
    s_q(l)|, the patches where the pair's reward difference lies, mean weight 1 (uniform 1 when no patch differs,
    where it is Diffusion-DPO). [n, patches]."""
    d = np.abs(np.asarray(shapes.patch_scores(x_w, patch)) - np.asarray(shapes.patch_scores(x_l, patch)))
    total = d.sum(-1, keepdims=True)
    return np.where(total > 0, d.shape[-1] * d / np.where(total > 0, total, 1.0), 1.0)


def shapes_branch(name: str, cfg: ShapesPreferenceConfig):
    """(patch errors (policy_w, policy_l, ref_w, ref_l) [b, patches], batch extras) -> loss of objective `name`; the
    per-image error is the mean over patches (= over the image's elements: the patches are equal)."""
    if name == "patch_dpo":
        fn = diffusion_objective("patch_dpo")
        return lambda e, extra: fn(policy_error_w=e[0], policy_error_l=e[1], patch_weights_w=extra["quality_w"],
                                   patch_weights_l=extra["quality_l"])[0]
    if name == "patch_weighted_dpo":
        fn = diffusion_objective("patch_weighted_dpo", beta=cfg.beta_dpo)
        return lambda e, extra: fn(policy_error_w=e[0], policy_error_l=e[1], reference_error_w=e[2],
                                   reference_error_l=e[3], patch_weights_w=extra["patch_weights"],
                                   patch_weights_l=extra["patch_weights"])[0]
    loss = objective_loss(name, cfg)  # sft, diffusion_dpo, dso_dpo, smpo, diffusion_dro, dso_dro: image errors
    return lambda e, extra: loss(tuple(jnp.mean(x, -1) for x in e), extra)[0]


SHAPES_EXTRAS = ("preference", "desirable_w", "desirable_l", "quality_w", "quality_l", "patch_weights")


def make_shapes_finetune(cfg: ShapesPreferenceConfig, schedule, apply_fn, optimizer, names: tuple[str, ...]):
    """A jitted (state, data, ref_params, index, length) -> (state, losses): `length` fine-tuning steps of objective
    names[index]. Every objective but d3po shares ONE compiled program (the objective is a traced index into
    `lax.switch`; the UNet's forward and backward, the costly part to compile, are outside the switch). The step's
    draws come from fold_in(data["key"], step): the same pairs, t and eps at every step for every objective."""
    branches = [shapes_branch(name, cfg) for name in names]
    t_min = cfg.base.t_min

    def patch_errors(params, x, t, eps):
        alpha, sigma = schedule.alpha(t)[:, None, None, None], schedule.sigma(t)[:, None, None, None]
        return shapes.patch_means((apply_fn(params, alpha * x + sigma * eps, t) - eps) ** 2, cfg.patch)

    def update(state, data, ref_params, index):
        k_idx, k_noise = jax.random.split(jax.random.fold_in(data["key"], state["step"]))
        n = data["kept"].shape[0]
        idx = jax.random.choice(k_idx, n, (cfg.batch,), p=data["kept"] / jnp.sum(data["kept"]))
        x_w, x_l = data["x_w"][idx], data["x_l"][idx]
        t, eps = networks.noise_draws(schedule, x_w.reshape(cfg.batch, -1), k_noise, t_min)  # one per pair, shared
        eps = eps.reshape(x_w.shape)
        ref = jax.lax.stop_gradient((patch_errors(ref_params, x_w, t, eps), patch_errors(ref_params, x_l, t, eps)))
        extra = {k: data[k][idx] for k in SHAPES_EXTRAS}

        def loss_fn(params):
            errors = (patch_errors(params, x_w, t, eps), patch_errors(params, x_l, t, eps)) + ref
            return jax.lax.switch(index, branches, errors, extra)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}, loss)

    def chunk(state, data, ref_params, index, length):
        return jax.lax.scan(lambda s, _: update(s, data, ref_params, index), state, None, length=length)

    return jax.jit(chunk, static_argnames=("length",))


def make_shapes_d3po(cfg: ShapesPreferenceConfig, schedule, apply_fn, optimizer):
    """d3po's jitted (state, data, ref_params, index, length) -> (state, losses) on its own trajectory pairs
    (`shapes_d3po_pairs`; `index` unused). Each step takes ONE uniformly drawn denoising step k per pair (the same k
    for winner and loser): an unbiased estimate of D3PO's mean over (pair, step) at the cost of one model call per
    image, the budget of the other objectives (a mean over all `nfe` steps would cost nfe times more). The step's
    log-density is log N(x_{k+1}; mu_theta(x_k), c_k^2 I) summed over the image's 768 elements, up to its constant
    (`step_logprobs`' convention)."""
    plan = {k: jnp.asarray(v) for k, v in stochastic_ddim_plan(schedule, cfg.nfe, cfg.eta_d3po).items()}
    d3po = diffusion_objective("d3po", beta=cfg.beta_d3po, clip_eps=cfg.clip_d3po)

    def logp(params, x_k, x_next, k):
        eps = apply_fn(params, x_k, plan["s"][k])
        mean = plan["ratio"][k][:, None, None, None] * x_k + plan["eps_coef"][k][:, None, None, None] * eps
        return (-jnp.sum((x_next - mean) ** 2, axis=(1, 2, 3)) / (2.0 * plan["c"][k] ** 2))[:, None]  # [b, 1 step]

    def update(state, data, ref_params):
        k_idx, k_step = jax.random.split(jax.random.fold_in(data["key"], state["step"]))
        n = data["kept"].shape[0]
        idx = jax.random.choice(k_idx, n, (cfg.batch,), p=data["kept"] / jnp.sum(data["kept"]))
        k = jax.random.randint(k_step, (cfg.batch,), 0, cfg.nfe)
        w = (data["traj_w"][idx, k], data["traj_w"][idx, k + 1])
        lo = (data["traj_l"][idx, k], data["traj_l"][idx, k + 1])
        ref_w, ref_l = jax.lax.stop_gradient((logp(ref_params, *w, k), logp(ref_params, *lo, k)))

        def loss_fn(params):
            return d3po(policy_logp_w=logp(params, *w, k), policy_logp_l=logp(params, *lo, k),
                        reference_logp_w=ref_w, reference_logp_l=ref_l)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}, loss)

    def chunk(state, data, ref_params, index, length):
        del index
        return jax.lax.scan(lambda s, _: update(s, data, ref_params), state, None, length=length)

    return jax.jit(chunk, static_argnames=("length",))


def image_noise(key, n: int):
    """x_T ~ N(0, I) [n, 16, 16, 3]: the VP marginal at t_max = 1 of the linear schedule is N(alpha_1 x0, sigma_1^2 I)
    with alpha_1 = 0.0064 (cosine at 0.9946: 0.0085), N(0, I) to within that shift for pixels in [-1, 1]."""
    return jax.random.normal(key, (n, shapes.SIZE, shapes.SIZE, 3))


def shapes_d3po_pairs(cfg: ShapesPreferenceConfig, schedule, apply_fn, base_params, key, data_key) -> tuple[dict, dict]:
    """D3PO's own pairs: per pair one x_T and two stochastic DDIM (eta_d3po) trajectories of the base from it, `nfe`
    steps each, labelled by the reward of their ends with the same tie rule; as many pairs as the others."""
    draw = make_trajectory_sampler(apply_fn, stochastic_ddim_plan(schedule, cfg.nfe, cfg.eta_d3po))
    k_T, k_a, k_b = jax.random.split(key, 3)
    x_T = image_noise(k_T, cfg.pairs)
    traj_a, traj_b = np.asarray(draw(base_params, x_T, k_a)), np.asarray(draw(base_params, x_T, k_b))
    labelled = label_image_pairs(traj_a[:, -1], traj_b[:, -1], cfg.tie_margin)
    kept = labelled["kept"]
    if not kept.any():
        raise ValueError(f"every d3po pair is a tie at tie_margin={cfg.tie_margin}; lower it")
    a_wins = (np.asarray(shapes.reward(traj_a[:, -1])) >= np.asarray(shapes.reward(traj_b[:, -1])))
    a_wins = a_wins[:, None, None, None, None]
    data = {"key": data_key, "kept": jnp.asarray(kept, jnp.float32),
            "traj_w": jnp.asarray(np.where(a_wins, traj_a, traj_b)),
            "traj_l": jnp.asarray(np.where(a_wins, traj_b, traj_a))}
    return data, {"pairs": cfg.pairs, "kept": int(kept.sum()), "ties": int((~kept).sum()),
                  "mean_reward_gap": float(np.mean(labelled["r_w"][kept] - labelled["r_l"][kept]))}


def shapes_pair_data(cfg: ShapesPreferenceConfig, xs, key) -> tuple[dict, dict]:
    """The fine-tuning data of 2 * pairs base samples xs (the first half against the second): winners, losers and
    every objective's extras (module docstring), and the pair counts."""
    pairs = label_image_pairs(xs[:cfg.pairs], xs[cfg.pairs:], cfg.tie_margin)
    kept = pairs["kept"]
    data, scale, median = preference_data(pairs, key, cfg.tie_margin)
    data = {**data,
            "quality_w": jnp.asarray(patch_quality(pairs["x_w"], cfg.patch), jnp.float32),
            "quality_l": jnp.asarray(patch_quality(pairs["x_l"], cfg.patch), jnp.float32),
            "patch_weights": jnp.asarray(patch_difference_weights(pairs["x_w"], pairs["x_l"], cfg.patch),
                                         jnp.float32)}
    stats = {"pairs": cfg.pairs, "kept": int(kept.sum()), "ties": int((~kept).sum()), "smpo_scale": scale,
             "dso_dro_median": median, "mean_reward_gap": float(np.mean(pairs["r_w"][kept] - pairs["r_l"][kept]))}
    return data, stats


def run_shapes_seed(cfg: DiffusionPreferenceConfig, workdir: str, seed: int, schedule, finetunes: dict,
                    draw) -> tuple[dict, int, int]:
    """({unit name: (samples, stats)}, units run, units skipped) for one seed of the shapes task."""
    sc = cfg.shapes
    names = ("base",) + sc.objective_names
    units = {name: load_arrays(_unit_path(workdir, seed, name)) for name in names}
    skipped = sum(u is not None for u in units.values())
    if skipped == len(names):
        return {name: (u[0]["samples"], u[1]) for name, u in units.items()}, 0, skipped

    k_base = jax.random.split(jax.random.key(seed), 5)[0]
    trained = harness.train(shapes_trainer(sc.base, schedule), sc.base,
                            RunDir(workdir).file(paths.join("base", f"seed_{seed}")), k_base, sc.base.num_chunks,
                            show_progress=cfg.show_progress, desc=f"base seed {seed}")
    base_params = trained.state["params"]
    k_pairs, k_ft, k_eval, k_ref, k_data, k_d3po = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), 6)
    xs = np.asarray(draw(base_params, image_noise(k_pairs, 2 * sc.pairs)))
    data, pair_stats = shapes_pair_data(sc, xs, k_ft)
    if "d3po" in sc.objective_names and units["d3po"] is None:
        d3po_data, d3po_counts = shapes_d3po_pairs(sc, schedule, make_unet(sc.base).apply, base_params, k_d3po, k_ft)
    x_eval = image_noise(k_eval, sc.eval_samples)
    reference_samples = draw(base_params, image_noise(k_ref, sc.eval_samples))  # independent base samples
    data_samples = shapes.sample(k_data, sc.eval_samples)[0]

    def evaluate(params) -> tuple[np.ndarray, dict]:
        samples = np.asarray(draw(params, x_eval))
        finite = float(np.mean(np.isfinite(samples).reshape(len(samples), -1).all(-1)))
        stats = {"params_sha256": params_sha256(params), "diverged": finite < 1.0, "finite_fraction": finite,
                 "reward": None, "mmd2_to_base": None, "mmd2_to_data": None}
        if finite == 1.0:
            stats.update(reward=float(jnp.mean(shapes.reward(samples))),
                         mmd2_to_base=float(mmd2_images(samples, reference_samples)),
                         mmd2_to_data=float(mmd2_images(samples, data_samples)))
        return samples, stats

    ran = 0
    if units["base"] is None:
        samples, stats = evaluate(base_params)
        stats = {**stats, **pair_stats, "base_final_loss": float(np.mean([r["loss"] for r in trained.history[-50:]]))}
        save_arrays(_unit_path(workdir, seed, "base"), {"samples": samples}, stats)
        units["base"] = ({"samples": samples}, stats)
        ran += 1
    optimizer = optax.adam(sc.lr)
    sizes = harness.chunk_sizes(sc.steps, sc.num_chunks)
    others = tuple(n for n in sc.objective_names if n != "d3po")
    for name in sc.objective_names:
        if units[name] is not None:
            continue
        clock = time.perf_counter()
        state = {"params": base_params, "opt_state": optimizer.init(base_params), "step": jnp.zeros((), jnp.int32)}
        index = jnp.int32(others.index(name) if name != "d3po" else 0)
        fn = finetunes["d3po" if name == "d3po" else "others"]
        pairs = d3po_data if name == "d3po" else data
        state, losses = fine_tune_in_chunks(
            lambda st, n, pairs=pairs: fn(st, pairs, base_params, index, length=n), state, sizes,
            f"seed {seed} {name}", cfg.show_progress)
        samples, stats = evaluate(state["params"])
        stats = _fine_tuning_stats(stats, losses, time.perf_counter() - clock)
        if name == "d3po":
            stats["d3po_pairs"] = d3po_counts  # its own pairs, made only when its unit runs
        save_arrays(_unit_path(workdir, seed, name), {"samples": samples}, stats)
        units[name] = ({"samples": samples}, stats)
        ran += 1
    return {name: (u[0]["samples"], u[1]) for name, u in units.items()}, ran, skipped


def plot_image_grid(workdir: str, seed: int, drawn: dict, columns: int = 8) -> None:
    """samples.png: one row per model (the base first), the first `columns` evaluation samples, all from the same
    x_T, so each column shows what fine-tuning did to one base sample."""
    if jax.process_index() != 0:
        return
    from matplotlib.figure import Figure

    names = list(drawn)
    fig = Figure(figsize=(1.1 * columns + 2.2, 1.15 * len(names)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(names), columns))
    for row, name in zip(axes, names):
        images, stats = drawn[name]
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images) and np.isfinite(images[j]).all():
                ax.imshow((np.clip(images[j], -1.0, 1.0) + 1.0) / 2.0, interpolation="nearest")
        label = name if stats.get("reward") is None else f"{name}\nr {stats['reward']:.3f}"
        if stats.get("diverged"):
            label = f"{name}\ndiverged"
        elif name != "base" and stats.get("mmd2_to_base") is not None:
            label += f"\nMMD² {stats['mmd2_to_base']:.1e}"
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"seed {seed}: base samples (top) and after each objective's fine-tuning, same x_T per column; "
                 f"r = mean reward ({shapes.REWARD.split(':')[0]})", fontsize=8)
    paths.save_figure(fig, RunDir(workdir).file("samples.png"), dpi=100)


def run_shapes(cfg: DiffusionPreferenceConfig, workdir: str) -> dict:
    """The shapes task (module docstring): every (seed, objective) unit, results.json and samples.png."""
    clock = time.perf_counter()
    sc = cfg.shapes
    schedule = get_schedule(sc.base.schedule)
    paths.makedirs(RunDir(workdir).root)
    claim(cfg, workdir)
    apply_fn = make_unet(sc.base).apply
    optimizer = optax.adam(sc.lr)
    finetunes = {"others": make_shapes_finetune(sc, schedule, apply_fn, optimizer,
                                                tuple(n for n in sc.objective_names if n != "d3po")),
                 "d3po": make_shapes_d3po(sc, schedule, apply_fn, optimizer)}
    draw = make_image_sampler(sc.base, schedule, sc.solver, sc.nfe)

    per_seed, ran, skipped = {}, 0, 0
    for seed in cfg.seed_list:
        per_seed[seed], r, s = run_shapes_seed(cfg, workdir, seed, schedule, finetunes, draw)
        ran, skipped = ran + r, skipped + s

    rows = objective_rows(per_seed, cfg.seed_list, sc.objective_names, "mmd2_to_data", extra=("seconds",))
    first = cfg.seed_list[0]
    plot_image_grid(workdir, first, per_seed[first])
    results = {"task": "shapes", **results_record(
        cfg, per_seed, rows, format_table(rows, "mmd2_to_data", "MMD^2 to data"), shapes.REWARD, sc.objective_names,
        ("reward", "mmd2_to_base", "mmd2_to_data", "params_sha256", "diverged", "finite_fraction"), SHAPES_NOT_DONE,
        (ran, skipped), MMD_BANDWIDTH, clock)}
    harness.write_results(workdir, results)
    return results


__all__ = ["DiffusionPreferenceConfig", "NOT_DONE", "OBJECTIVES", "SHAPES_NOT_DONE", "SHAPES_OBJECTIVES",
           "ShapesPreferenceConfig", "label_image_pairs", "label_pairs", "patch_difference_weights", "patch_quality",
           "reward", "run", "run_shapes", "run_vectors"]
