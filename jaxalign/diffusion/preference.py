"""Preference objectives for diffusion models: pure functions of per-sample denoising errors (or per-step log-probs),
and their registry.

Like the LM objectives (`jaxalign.losses`), an objective never sees the network. The training loop runs the policy
and the frozen reference denoiser and passes what the objective reads, by keyword:

- `policy_error_w`, `reference_error_w`, `policy_error_l`, `reference_error_l`: the denoising loss of the winner
  (w) and the loser (l) under the policy and the reference, e = mean over the latent's elements of
  (eps_pred(x_t, t, c) - eps)^2 (velocity or v-prediction loss for models trained that way), with the SAME t and
  noise eps for winner and loser and for policy and reference (Diffusion-DPO's recipe). Shape [batch]; per segment
  [batch, segments] for DenseDPO and per patch [batch, patches] for PatchDPO (the mean over the segment's or the
  patch's elements).
- D3PO: `policy_logp_*` / `reference_logp_*` [batch, steps], log N(x_{k-1}; mu(x_k), s_k^2 I) of each stored step
  of a stochastic DDIM trajectory under the policy and the reference.
- extras each objective names in its signature (SmPO's `preference`, DenseDPO's `segment_labels`, PatchDPO's
  `patch_weights_*`, DSO-DRO's `desirable`).

Each returns (loss, metrics) as the LM objectives do: a scalar batch mean and a dict of scalar metrics (held out of
the gradient). The implicit reward of a sample is r = -(beta/2) (e_theta - e_ref) (the argument of Diffusion-DPO's
sigmoid is r_w - r_l); pairwise objectives log "rewards/chosen", "rewards/rejected", "rewards/margin" and
"rewards/accuracy" = mean(r_w > r_l) with those names, plus "errors/policy" and "errors/reference" (the mean
denoising loss over winners and losers, the authors' "raw model loss").

`DIFFUSION_OBJECTIVES` maps a name to its `DiffusionObjectiveSpec` (function, paper, inputs, default
hyper-parameters); `diffusion_objective(name, **hyper)` checks the hyper-parameters and returns the loss function.
Invalid inputs (mismatched shapes, an unknown name, a bad hyper-parameter) are one ValueError naming the argument and
its value. Hyper-parameters that are traced (swept under jit) are not checked.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]
Objective = Callable[..., tuple[jax.Array, Metrics]]

# ------------------------------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class DiffusionObjectiveSpec:
    """A registered diffusion preference objective.

    name: the registry key. fn: the pure function (keyword inputs, then keyword-only hyper-parameters).
    paper: the citation and the equation (or the authors' code) the function follows.
    The inputs and hyper-parameters are read from fn's signature, so they cannot drift from it.
    """

    name: str
    fn: Objective
    paper: str

    def _parameters(self):
        return inspect.signature(self.fn).parameters.values()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The arrays the objective needs (positional-or-keyword parameters without a default)."""
        return tuple(p.name for p in self._parameters()
                     if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """Arrays it reads when given (default None)."""
        return tuple(p.name for p in self._parameters()
                     if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty)

    @property
    def defaults(self) -> dict[str, Any]:
        """The hyper-parameters (keyword-only parameters) and their defaults."""
        return {p.name: p.default for p in self._parameters() if p.kind == p.KEYWORD_ONLY}


DIFFUSION_OBJECTIVES: dict[str, DiffusionObjectiveSpec] = {}


def _register(name: str, paper: str) -> Callable[[Objective], Objective]:
    def add(fn: Objective) -> Objective:
        if name in DIFFUSION_OBJECTIVES:
            raise ValueError(f"diffusion objective {name!r} is already registered")
        DIFFUSION_OBJECTIVES[name] = DiffusionObjectiveSpec(name, fn, paper)
        return fn

    return add


def get_diffusion_spec(name: str) -> DiffusionObjectiveSpec:
    if name not in DIFFUSION_OBJECTIVES:
        raise ValueError(f"unknown diffusion objective {name!r}; registered: {', '.join(sorted(DIFFUSION_OBJECTIVES))}")
    return DIFFUSION_OBJECTIVES[name]


def diffusion_objective(name: str, **hyperparameters: Any) -> Objective:
    """The loss function of objective `name` with `hyperparameters` bound (the rest keep their defaults): call it
    with the inputs by keyword, `loss, metrics = fn(policy_error_w=..., ...)`. Pure and jit-able.

    An unknown name, an unknown hyper-parameter or an out-of-range value is one ValueError naming it."""
    spec = get_diffusion_spec(name)
    defaults = spec.defaults
    for key, value in hyperparameters.items():
        if key not in defaults:
            raise ValueError(f"diffusion objective {name!r} takes no hyper-parameter {key!r} (got {key}={value!r}); "
                             f"it accepts: {', '.join(sorted(defaults)) or 'none'}")
    _check_hyper(name, **{**defaults, **hyperparameters})
    return functools.partial(spec.fn, **hyperparameters)


# ------------------------------------------------------------------------------------------------------------------
# checks

_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: _real(v) and math.isfinite(v) and v > 0, "a finite real number > 0"),
    "margin": (lambda v: _real(v) and math.isfinite(v) and v >= 0, "a finite real number >= 0"),
    "clip_eps": (lambda v: v is None or (_real(v) and 0 < v < 1), "None (no clipping) or a real number in (0, 1)"),
}


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyper(objective: str, **values: Any) -> None:
    """One ValueError naming the first hyper-parameter out of range (traced values pass: they cannot be read)."""
    for key, value in values.items():
        if isinstance(value, jax.core.Tracer):
            continue
        ok, expected = _RULES[key]
        scalar = value.item() if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 else value
        if not ok(scalar):
            raise ValueError(f"{objective}: hyper-parameter {key} must be {expected}, got {key}={value!r}")


def _arrays(objective: str, ndim: int, what: str, **arrays: Any) -> list[jax.Array]:
    """The arrays as jnp arrays, all of the first one's shape, each `ndim`-D with a non-empty batch; else one
    ValueError naming the argument and its shape."""
    out, first = [], None
    for key, value in arrays.items():
        try:
            array = jnp.asarray(value)
        except TypeError as err:
            raise ValueError(f"{objective}: {key} must be an array {what}, got {type(value).__name__}") from err
        if array.ndim != ndim:
            raise ValueError(f"{objective}: {key} must be a {ndim}-D array {what}, got shape {tuple(array.shape)}")
        if first is None:
            first = (key, array.shape)
            if array.shape[0] == 0:
                raise ValueError(f"{objective}: {key} has an empty batch (shape {tuple(array.shape)})")
        elif array.shape != first[1]:
            raise ValueError(f"{objective}: {key} must have the shape of {first[0]} {tuple(first[1])}, got shape "
                             f"{tuple(array.shape)}")
        out.append(array)
    return out


def _pair_metrics(reward_w: jax.Array, reward_l: jax.Array, errors: tuple[jax.Array, ...]) -> Metrics:
    """The implicit-reward metrics (LM names) and the mean denoising losses of policy and reference."""
    reward_w, reward_l = jax.lax.stop_gradient(reward_w), jax.lax.stop_gradient(reward_l)
    p_w, p_l, r_w, r_l = (jax.lax.stop_gradient(e) for e in errors)
    return {
        "rewards/chosen": jnp.mean(reward_w),
        "rewards/rejected": jnp.mean(reward_l),
        "rewards/margin": jnp.mean(reward_w - reward_l),
        "rewards/accuracy": jnp.mean((reward_w > reward_l).astype(jnp.float32)),
        "errors/policy": 0.5 * (jnp.mean(p_w) + jnp.mean(p_l)),
        "errors/reference": 0.5 * (jnp.mean(r_w) + jnp.mean(r_l)),
    }


_PAIR = "[batch] (one per pair)"

# ------------------------------------------------------------------------------------------------------------------
# objectives


@_register("diffusion_dpo", "Wallace et al. 2024, 'Diffusion Model Alignment Using Direct Preference Optimization' "
                            "(CVPR), the final objective; SalesforceAIResearch/DiffusionDPO train.py")
def diffusion_dpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, *, beta=5000.0):
    """Diffusion-DPO: Wallace et al. (2024), the paper's final objective, in the form of the authors' train.py:

        loss = mean_i -log sigmoid( -(beta/2) [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ] ),

    e the per-sample denoising loss (module docstring) at one t and noise shared by winner and loser. The paper's
    constant T*omega(lambda_t) (omega constant for the eps-loss) is folded into beta; the code's scale -beta/2 is kept,
    so beta means what the authors' --beta_dpo means (default 5000, their SD1.5 / SDXL launchers). Equal policy and
    reference errors give log 2 exactly. Inputs [batch]; beta > 0.
    """
    _check_hyper("diffusion_dpo", beta=beta)
    p_w, p_l, r_w, r_l = _arrays("diffusion_dpo", 1, _PAIR, policy_error_w=policy_error_w,
                                 policy_error_l=policy_error_l, reference_error_w=reference_error_w,
                                 reference_error_l=reference_error_l)
    reward_w, reward_l = -0.5 * beta * (p_w - r_w), -0.5 * beta * (p_l - r_l)
    loss = -jnp.mean(jax.nn.log_sigmoid(reward_w - reward_l))
    return loss, _pair_metrics(reward_w, reward_l, (p_w, p_l, r_w, r_l))


@_register("dso_dpo", "Li et al. 2025, 'DSO: Aligning 3D Generators with Simulation Feedback for Physical "
                      "Soundness' (DPO form); RuiningLi/dso finetune.py forward_dpo_loss")
def dso_dpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, *, beta=500.0):
    """DSO's DPO form (Li et al. 2025, Direct Simulation Optimization; the authors' finetune.py forward_dpo_loss):
    Diffusion-DPO (`diffusion_dpo`, Wallace et al., the same function of the same inputs) applied to the
    flow-matching loss e = mean ||v_pred(x_t, t) - (eps - x_0)||^2 of TRELLIS, winner = a generated 3-D object the
    physics simulator finds stable, loser = one it finds unstable (for the same image). Only the default differs:
    beta = 500, the authors' configs/dpo.yaml (dpo_beta). Their code draws the reference's noise separately unless
    sample_same_epsilon; give policy and reference the same noise here.
    """
    _check_hyper("dso_dpo", beta=beta)
    return diffusion_dpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, beta=beta)


@_register("dso_dro", "Li et al. 2025, 'DSO: Aligning 3D Generators with Simulation Feedback for Physical "
                      "Soundness' (DRO form); RuiningLi/dso finetune.py forward_dro_loss")
def dso_dro(policy_error, desirable, reference_error=None):
    """DSO's direct reward optimization (DRO; Li et al. 2025), unpaired: each sample carries its own binary
    reward (the simulator's stability label, stable = desirable), and the loss lowers the denoising loss of
    desirable samples and raises that of undesirable ones,

        loss = mean_{i desirable} d_i - mean_{i undesirable} d_i,   d_i = e_theta(x_i) - e_ref(x_i),

    linear, with no sigmoid and no temperature. This follows the authors' finetune.py forward_dro_loss
    (mean(e_theta(w) - e_theta(l)) over a batch of one stable and one unstable sample per image), written for
    unpaired batches: with as many desirable as undesirable samples it is exactly that mean. Choices (we could not
    read the paper's DRO equation; this is the code's form): the reference term is optional (None: d = e_theta, as
    in the code); it is a constant for the gradient, so it shifts the loss value only. A batch without desirable
    (or undesirable) samples contributes 0 for that group. `desirable` [n]: 1.0 desirable, 0.0 undesirable (values
    > 0.5 count as desirable, as in `jaxalign.losses`' unpaired objectives); errors [n].
    """
    arrays = {"policy_error": policy_error, "desirable": desirable}
    if reference_error is not None:
        arrays["reference_error"] = reference_error
    checked = _arrays("dso_dro", 1, "[n] (one per sample)", **arrays)
    policy, labels = checked[0], checked[1]
    reference = checked[2] if reference_error is not None else jnp.zeros_like(policy)
    good = (labels > 0.5).astype(policy.dtype)
    bad = 1.0 - good
    d = policy - reference
    n_good, n_bad = jnp.sum(good), jnp.sum(bad)
    mean_good = jnp.sum(good * d) / jnp.maximum(n_good, 1.0)
    mean_bad = jnp.sum(bad * d) / jnp.maximum(n_bad, 1.0)
    sg = jax.lax.stop_gradient
    metrics = {
        "errors/desirable": sg(jnp.sum(good * policy) / jnp.maximum(n_good, 1.0)),
        "errors/undesirable": sg(jnp.sum(bad * policy) / jnp.maximum(n_bad, 1.0)),
        "count/desirable": n_good,
    }
    return mean_good - mean_bad, metrics


@_register("smpo", "Lu et al. 2025, 'Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion "
                   "Models with Varied Human Preferences' (ICML); JaydenLyh/SmPO train.py")
def smpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, preference, *, beta=50000.0):
    """SmPO-Diffusion (Lu et al. 2025): Diffusion-DPO with the binary label replaced by a smoothed preference
    p = P(w preferred to l) in [0, 1] from a reward model, the Bradley-Terry arguments averaged over the two
    orderings with weights p and 1-p (the paper's preference-likelihood averaging):

        loss = mean_i -log sigmoid( (2 p_i - 1) * -(beta/2) [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ] ).

    Form of the authors' train.py (scale_term = -0.5 beta_dpo (2p - 1) * 10); the paper's equation number is not
    re-checked here. p = 1 is Diffusion-DPO; p = 1/2 (equally good samples) gives log 2 with zero gradient; p < 1/2
    reverses the pair. The code's extra constant 10 is folded into beta: the default 50000 is their SDXL setting
    (--beta_dpo 5000, times 10; SD1.5 used 2000, i.e. 20000 here). `smoothed_preference` computes p from reward
    scores as the code does. SmPO's other half, ReNoise (DDIM) inversion to choose x_t instead of forward noising,
    is the training loop's business: it changes the errors passed in, not this loss. `preference` [batch].
    """
    _check_hyper("smpo", beta=beta)
    p_w, p_l, r_w, r_l, pref = _arrays("smpo", 1, _PAIR, policy_error_w=policy_error_w, policy_error_l=policy_error_l,
                                       reference_error_w=reference_error_w, reference_error_l=reference_error_l,
                                       preference=preference)
    reward_w, reward_l = -0.5 * beta * (p_w - r_w), -0.5 * beta * (p_l - r_l)
    loss = -jnp.mean(jax.nn.log_sigmoid((2.0 * pref - 1.0) * (reward_w - reward_l)))
    metrics = _pair_metrics(reward_w, reward_l, (p_w, p_l, r_w, r_l))
    metrics["smpo/preference"] = jnp.mean(jax.lax.stop_gradient(pref))
    return loss, metrics


def smoothed_preference(score_w, score_l, scale=1.0):
    """SmPO's smoothed preference p = exp(s_w/scale) / (exp(s_w/scale) + exp(s_l/scale)) = sigmoid((s_w - s_l)/scale)
    from reward scores (the authors normalise PickScore by its range, i.e. scale = max - min of the data's scores)."""
    if not (_real(scale) and scale > 0):
        raise ValueError(f"smoothed_preference: scale must be a real number > 0, got scale={scale!r}")
    return jax.nn.sigmoid((jnp.asarray(score_w) - jnp.asarray(score_l)) / scale)


@_register("dense_dpo", "Wu et al. 2025, 'DenseDPO: Fine-Grained Temporal Preference Optimization for Video "
                        "Diffusion Models' (segment-level Diffusion-DPO, from the abstract; no public code read)")
def dense_dpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, segment_labels, *, beta=5000.0):
    """DenseDPO (2025): Diffusion-DPO on aligned short temporal segments of a video pair. Written from the abstract
    (no equation or code was available to us): the two videos are denoised from corrupted copies of one video, so
    their segments are aligned in time, and annotators label each segment. Each labelled segment is one Diffusion-DPO
    pair:

        d_{i,s} = (e_theta(w)_{i,s} - e_ref(w)_{i,s}) - (e_theta(l)_{i,s} - e_ref(l)_{i,s}),
        loss = sum_{i,s} m_{i,s} * -log sigmoid( -y_{i,s} (beta/2) d_{i,s} ) / max(1, sum_{i,s} m_{i,s}),

    with e_{i,s} the denoising loss over segment s's frames (one t and one noise for the whole video pair), y =
    sign(segment_labels) (+1: video "w" wins the segment, -1: video "l" wins it, 0: a tie or no label) and m =
    |y|. Choices: ties are left out (not pulled towards log 2); the mean is over all labelled segments of the batch
    (each segment comparison counts as one pair, the dense signal the paper argues for); a batch without labels has
    loss 0. One segment labelled +1 is exactly Diffusion-DPO. Inputs [batch, segments].
    """
    _check_hyper("dense_dpo", beta=beta)
    p_w, p_l, r_w, r_l, labels = _arrays(
        "dense_dpo", 2, "[batch, segments]", policy_error_w=policy_error_w, policy_error_l=policy_error_l,
        reference_error_w=reference_error_w, reference_error_l=reference_error_l, segment_labels=segment_labels)
    sign = jnp.sign(labels).astype(p_w.dtype)
    mask = jnp.abs(sign)
    reward_w, reward_l = -0.5 * beta * (p_w - r_w), -0.5 * beta * (p_l - r_l)
    per_segment = -jax.nn.log_sigmoid(sign * (reward_w - reward_l))
    count = jnp.sum(mask)
    loss = jnp.sum(mask * per_segment) / jnp.maximum(count, 1.0)
    # metrics on the labelled segments, winner = the segment's preferred video
    sg = jax.lax.stop_gradient
    chosen = jnp.where(sign >= 0, reward_w, reward_l)
    rejected = jnp.where(sign >= 0, reward_l, reward_w)
    n = jnp.maximum(count, 1.0)
    metrics = {
        "rewards/chosen": sg(jnp.sum(mask * chosen) / n),
        "rewards/rejected": sg(jnp.sum(mask * rejected) / n),
        "rewards/margin": sg(jnp.sum(mask * (chosen - rejected)) / n),
        "rewards/accuracy": sg(jnp.sum(mask * (chosen > rejected)) / n),
        "errors/policy": sg(0.5 * (jnp.mean(p_w) + jnp.mean(p_l))),
        "errors/reference": sg(0.5 * (jnp.mean(r_w) + jnp.mean(r_l))),
        "count/labelled_segments": count,
    }
    return loss, metrics


@_register("patch_weighted_dpo", "jaxalign's composition, not a paper's objective: Diffusion-DPO (Wallace et al. "
                                 "2024) on PatchDPO's (Huang et al. 2025) patch-weighted errors")
def patch_weighted_dpo(policy_error_w, policy_error_l, reference_error_w, reference_error_l, patch_weights_w,
                       patch_weights_l, *, beta=5000.0):
    """Diffusion-DPO on patch-weighted errors, a composition of ours (PatchDPO's own released loss is `patch_dpo`):
    each sample's error difference is a patch-weighted mean,

        S_i = (1/P) sum_p a_{i,p} (e_theta_{i,p} - e_ref_{i,p}),
        loss = mean_i -log sigmoid( -(beta/2) [ S(w)_i - S(l)_i ] ),

    with e_{i,p} the denoising loss over patch p's elements (P equal patches) and a >= 0 the patch weights the
    caller derives from PatchDPO's patch-quality estimate (how is the caller's choice). It is Diffusion-DPO with each
    side's error replaced by the patch-weighted mean, for comparing patch weights with a reference-anchored pairwise
    loss on the same pairs; PatchDPO itself trains the reference-free weighted denoising loss of `patch_dpo`. Weights
    enter linearly (divided by P, not by their sum), so a zero weight drops a patch and all-zero weights give S = 0.
    With a = 1 everywhere S = mean_p e_theta - mean_p e_ref, so patch_weighted_dpo(e, a=1) ==
    diffusion_dpo(e.mean(-1)) (and, for equal patches, the image-level Diffusion-DPO).
    Inputs [batch, patches].
    """
    _check_hyper("patch_weighted_dpo", beta=beta)
    p_w, p_l, r_w, r_l, a_w, a_l = _arrays(
        "patch_weighted_dpo", 2, "[batch, patches]", policy_error_w=policy_error_w, policy_error_l=policy_error_l,
        reference_error_w=reference_error_w, reference_error_l=reference_error_l, patch_weights_w=patch_weights_w,
        patch_weights_l=patch_weights_l)
    reward_w = -0.5 * beta * jnp.mean(a_w * (p_w - r_w), axis=-1)
    reward_l = -0.5 * beta * jnp.mean(a_l * (p_l - r_l), axis=-1)
    loss = -jnp.mean(jax.nn.log_sigmoid(reward_w - reward_l))
    return loss, _pair_metrics(reward_w, reward_l, (p_w, p_l, r_w, r_l))


@_register("patch_dpo", "Huang et al. 2025, 'PatchDPO: Patch-level DPO for Finetuning-free Personalized Image "
                        "Generation' (CVPR): the weighted training of the authors' released code (train_patchdpo.py)")
def patch_dpo(policy_error_w, policy_error_l, patch_weights_w, patch_weights_l):
    """PatchDPO's weighted training in the form of the authors' released code (train_patchdpo.py, weighted_mse_loss
    with region weights): a patch-weighted denoising loss on both images of the pair, no reference and no sigmoid,

        loss = (1/2) mean_i [ (1/P) sum_p a(w)_{i,p} e_theta(w)_{i,p} + (1/P) sum_p a(l)_{i,p} e_theta(l)_{i,p} ],

    which is their mean over the 2*batch images and all elements of (weight * squared error) when the P patches are
    equal. In their code w is the reference (subject) image with weights 1 - its quality map and l the generated
    image with weights its patch-quality map: the generated image is reconstructed where it is good, the reference
    where the generated one is bad. Inputs [batch, patches]; the shared noise and t as in Diffusion-DPO.
    """
    p_w, p_l, a_w, a_l = _arrays("patch_dpo", 2, "[batch, patches]", policy_error_w=policy_error_w,
                                 policy_error_l=policy_error_l, patch_weights_w=patch_weights_w,
                                 patch_weights_l=patch_weights_l)
    weighted_w = jnp.mean(a_w * p_w, axis=-1)
    weighted_l = jnp.mean(a_l * p_l, axis=-1)
    loss = 0.5 * (jnp.mean(weighted_w) + jnp.mean(weighted_l))
    sg = jax.lax.stop_gradient
    return loss, {"errors/weighted_w": sg(jnp.mean(weighted_w)), "errors/weighted_l": sg(jnp.mean(weighted_l)),
                  "errors/policy": sg(0.5 * (jnp.mean(p_w) + jnp.mean(p_l)))}


@_register("diffusion_dro", "Wu et al. 2025, 'Ranking-based Preference Optimization for Diffusion Models from "
                            "Implicit User Feedback' (NeurIPS, Diffusion-DRO); basiclab/DiffusionDRO train.py")
def diffusion_dro(policy_error_w, policy_error_l, reference_error_w, reference_error_l, *, margin=0.001):
    """Diffusion-DRO (Wu et al. 2025): a max-margin ranking of an offline expert demonstration (w) above an online
    sample of the current policy (l), in denoising form:

        loss = mean_i max(0, (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) + margin).

    Form of the authors' train.py (hinge with --margin, default 0.001); the paper's equation number is not re-checked
    here. Choices left to the caller, as in the code: w is an expert image forward-noised at t with fresh noise; l is
    the x_t stored at step t of a policy-sampled trajectory with the noise implied by it; the same t for both, and
    policy and reference see the same x_t. No temperature: the hinge is linear in the errors (the paper's point
    against the sigmoid). margin >= 0. Inputs [batch].
    """
    _check_hyper("diffusion_dro", margin=margin)
    p_w, p_l, r_w, r_l = _arrays("diffusion_dro", 1, _PAIR, policy_error_w=policy_error_w,
                                 policy_error_l=policy_error_l, reference_error_w=reference_error_w,
                                 reference_error_l=reference_error_l)
    diff = (p_w - r_w) - (p_l - r_l)
    loss = jnp.mean(jax.nn.relu(diff + margin))
    # rewards as in Diffusion-DPO with beta = 2 (r = -(e_theta - e_ref)): the hinge is on r_l - r_w + margin
    metrics = _pair_metrics(-(p_w - r_w), -(p_l - r_l), (p_w, p_l, r_w, r_l))
    metrics["hinge/active_fraction"] = jnp.mean((jax.lax.stop_gradient(diff) + margin > 0).astype(jnp.float32))
    return loss, metrics


@_register("d3po", "Yang et al. 2024, 'Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model' "
                   "(CVPR, D3PO, its per-step DPO objective); yk7333/d3po scripts/train.py (clipping)")
def d3po(policy_logp_w, policy_logp_l, reference_logp_w, reference_logp_l, *, beta=0.1, clip_eps=0.1):
    """D3PO (Yang et al. 2024): the denoising chain is an MDP; each step k of the preferred and the dispreferred
    stochastic DDIM trajectories (both from the same x_T and prompt) is one DPO pair of actions:

        rho_k = clip( pi_theta(x_{k-1} | x_k) / pi_ref(x_{k-1} | x_k), 1 - clip_eps, 1 + clip_eps ),
        loss = mean_{i,k} -log sigmoid( beta [ log rho_k(w) - log rho_k(l) ] ).

    The per-step form is the paper's; the clip is the authors' scripts/train.py (train.eps = 0.1; beta = 0.1 in
    config/base.py), done here in log space (clip the log-ratio to [log(1-eps), log(1+eps)], the same value and the
    same zero gradient outside the range, without overflow of exp). clip_eps=None is the paper's unclipped loss.
    Choices: the mean is over steps and pairs (the code steps the optimiser per step; one mean is its batched
    equivalent); ties are the caller's to drop (the code gives them zero gradient). Exact relation: with clipping
    inactive it is the LM sigmoid DPO (`jaxalign.losses` 'sigmoid') with each (pair, step) as one pair and the step
    log-probs as single-token sequences; with one step, the sigmoid DPO on the trajectories. Inputs [batch, steps].
    """
    _check_hyper("d3po", beta=beta, clip_eps=clip_eps)
    lp_w, lp_l, rf_w, rf_l = _arrays("d3po", 2, "[batch, steps]", policy_logp_w=policy_logp_w,
                                     policy_logp_l=policy_logp_l, reference_logp_w=reference_logp_w,
                                     reference_logp_l=reference_logp_l)
    z_w, z_l = lp_w - rf_w, lp_l - rf_l
    if clip_eps is None:
        c_w, c_l, clipped = z_w, z_l, jnp.zeros(())
    else:
        low, high = jnp.log1p(-clip_eps), jnp.log1p(clip_eps)
        c_w, c_l = jnp.clip(z_w, low, high), jnp.clip(z_l, low, high)
        outside = lambda z: ((z < low) | (z > high)).astype(z.dtype)  # noqa: E731
        clipped = 0.5 * (jnp.mean(outside(z_w)) + jnp.mean(outside(z_l)))
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * (c_w - c_l)))
    sg = jax.lax.stop_gradient
    chosen, rejected = sg(beta * c_w), sg(beta * c_l)
    metrics = {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margin": jnp.mean(chosen - rejected),
        "rewards/accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "d3po/clip_fraction": sg(clipped),
    }
    return loss, metrics
