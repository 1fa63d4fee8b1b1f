"""A small diffusion model trained on the exact 2-D Gaussian mixture, sampled with every fast ODE solver and scored
against the mixture itself (`jaxalign run diffusion_gmm --workdir DIR [key=value ...]`).

Training: `jaxalign.diffusion.networks.VectorDenoiser` (an MLP eps_theta(x_t, t)) minimises the denoising loss
(Ho et al. 2020, DDPM, eq. 14, in continuous VP time: `networks.denoising_loss`) on `batch` fresh exact samples
of `gmm.mixture_2d()` per step, with optax Adam (cosine learning-rate decay by default). The steps run on the RL
harness (`rl.harness`): `num_chunks` jitted scans, a checkpoint of the whole state (params, Adam state, PRNG key,
step) after each, metrics.jsonl (loss and gradient norm per step), progress with rate and ETA in Adam steps, a
stop at the first non-finite loss. The data are drawn inside the step, so nothing of the state is a batch: it is
all replicated over the devices.

Evaluation: one x_T of `samples` draws from the exact p_T; every solver of `solvers` at every NFE of `nfes`
(`samplers.plan`, spacing uniform in log-SNR, down to t = 1e-3) runs from it with the trained network and with the
exact mixture noise prediction (`gmm.eps_model`: the best any network could do); the squared MMD to the mixture
(`gmm.mmd2_to_mixture`, bandwidth 0.5, the mixture's terms in closed form) of each is reported, next to the
untrained network's (DDIM) and exact samples' (the floor, ~0 up to the U-statistic's noise). The loss is likewise
reported next to the irreducible denoising error of the mixture, E||eps - eps*(x_t)||^2 with the exact eps*,
estimated (with its standard error) on fresh draws.

Writes: config.json, checkpoints/, metrics.jsonl, results.json (the tables, final loss, wall time, params sha256),
learning_curve.png (loss per step with the irreducible error) and samples.png (exact samples vs the trained
model's with the last solver at the largest NFE).

Resume: re-running the same command continues a killed run from its newest chunk and computes bit-identical
parameters and results (the harness's guarantee; tests/jaxalign/experiments/test_diffusion_gmm.py checks it).

The config, the network and the trainer live in `jaxalign.experiments.diffusion_kit`, shared with
`diffusion_preference` (which fine-tunes this base model).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.experiments.diffusion_kit import (BANDWIDTH, T_END, DiffusionGMMConfig, diffusion_trainer, init_params,
                                                make_network)
from jaxalign.rundir import RunDir, params_sha256
from rl import harness

IRREDUCIBLE_DRAWS = 400_000


def irreducible_loss(schedule, key, n: int, t_min: float) -> tuple[float, float]:
    """(estimate, standard error) of E||eps - E[eps | x_t]||^2, the smallest denoising loss any network can reach:
    the loss of the exact mixture noise prediction (`gmm.eps_model`) on n fresh draws of (x_0, t, eps), in float64
    (this form is first-order insensitive to rounding in eps*, unlike d - E||eps*||^2)."""
    with jax.enable_x64(True):
        mix = gmm.mixture_2d()
        k_x, k_noise = jax.random.split(key)
        x0 = gmm.sample(mix, k_x, n)
        t, eps = networks.noise_draws(schedule, x0, k_noise, t_min)
        x_t = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * eps
        errors = np.asarray(jnp.sum((jax.vmap(gmm.eps_model(mix, schedule))(x_t, t) - eps) ** 2, -1))
    return float(errors.mean()), float(errors.std() / np.sqrt(n))


def mmd_table(cfg: DiffusionGMMConfig, models: dict, schedule, mix, x_T) -> tuple[dict, dict]:
    """({row: {nfe: MMD^2}}, {row: {nfe: samples}}) for every (solver, model) pair."""
    table, drawn = {}, {}
    for solver in cfg.solver_names:
        for label, model in models.items():
            row = f"{solver} ({label})"
            drawn[row] = {nfe: samplers.sample(solver, model, schedule, x_T, nfe, t_end=T_END) for nfe in cfg.nfe_list}
            table[row] = {nfe: float(gmm.mmd2_to_mixture(xs, mix, BANDWIDTH)) for nfe, xs in drawn[row].items()}
    return table, drawn


def format_table(table: dict) -> str:
    nfes = list(next(iter(table.values())))
    lines = ["| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.2e}" for k in nfes) + " |" for name, row in table.items()]
    return "\n".join(lines)


def plot_samples(workdir: str, exact: np.ndarray, model: np.ndarray, title: str) -> None:
    if jax.process_index() != 0:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="tight")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, xs, name, color in ((axes[0], exact, "exact mixture samples", "tab:green"),
                                (axes[1], model, title, "tab:blue")):
        ax.scatter(xs[:, 0], xs[:, 1], s=2, alpha=0.5, color=color)
        ax.set(title=name, xlim=(-3.5, 3.5), ylim=(-2.5, 3.0))
        ax.set_aspect("equal")
    paths.save_figure(fig, RunDir(workdir).file("samples.png"), dpi=120)


def run(cfg: DiffusionGMMConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), sample, measure, and write results.json and the plots."""
    clock = time.perf_counter()
    schedule, mix = get_schedule(cfg.schedule), gmm.mixture_2d()
    key = jax.random.key(cfg.seed)
    k_train, k_T, k_exact, k_irreducible, k_untrained = jax.random.split(key, 5)
    trained = harness.train(diffusion_trainer(cfg, schedule, mix), cfg, workdir, k_train, cfg.num_chunks,
                            show_progress=cfg.show_progress, desc="diffusion gmm")
    state, history = trained.state, trained.history
    apply_fn = make_network(cfg, schedule).apply

    sample_start = time.perf_counter()
    x_T = gmm.sample_marginal(mix, schedule, k_T, cfg.samples, schedule.t_max)
    models = {"trained network": networks.model_fn(apply_fn, state["params"]),
              "exact score": gmm.eps_model(mix, schedule)}
    table, drawn = mmd_table(cfg, models, schedule, mix, x_T)
    untrained = networks.model_fn(apply_fn, init_params(cfg, schedule, k_untrained))
    table["ddim (untrained network)"] = {
        nfe: float(gmm.mmd2_to_mixture(samplers.sample("ddim", untrained, schedule, x_T, nfe, t_end=T_END), mix,
                                       BANDWIDTH)) for nfe in cfg.nfe_list}
    exact = gmm.sample(mix, k_exact, cfg.samples)
    table["exact samples (floor)"] = dict.fromkeys(cfg.nfe_list, float(gmm.mmd2_to_mixture(exact, mix, BANDWIDTH)))
    sample_seconds = time.perf_counter() - sample_start

    losses = np.array([r["loss"] for r in history])
    tail = max(1, min(100, len(losses) // 10))
    irreducible, irreducible_stderr = irreducible_loss(schedule, k_irreducible, IRREDUCIBLE_DRAWS, cfg.t_min)
    last_solver, top_nfe = cfg.solver_names[-1], max(cfg.nfe_list)
    results = {
        "final_loss": float(losses[-tail:].mean()),
        "final_loss_window": tail,
        "first_loss": float(losses[0]),
        "irreducible_loss": irreducible,
        "irreducible_loss_stderr": irreducible_stderr,
        "mmd2": {row: {str(nfe): v for nfe, v in values.items()} for row, values in table.items()},
        "mmd2_table": format_table(table),
        "mmd_bandwidth": BANDWIDTH,
        "steps": cfg.steps,
        "steps_trained_here": trained.updates_trained,  # by this process: fewer than steps after a resume
        "train_seconds": trained.train_seconds,
        "steps_per_second": trained.updates_trained / trained.train_seconds if trained.updates_trained else None,
        "first_chunk_seconds_with_compile": trained.first_chunk_seconds,
        "sample_seconds": sample_seconds,
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
        "params_sha256": params_sha256(state["params"]),
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(workdir, history, "update", {"denoising loss": "loss"},
                                title=f"VectorDenoiser on the 2-D mixture ({cfg.schedule} VP)", xlabel="Adam step",
                                ylabel="denoising loss", hline=(irreducible, f"irreducible error {irreducible:.3f}"))
    plot_samples(workdir, np.asarray(exact), np.asarray(drawn[f"{last_solver} (trained network)"][top_nfe]),
                 f"trained network, {last_solver}, NFE {top_nfe}")
    return results


__all__ = ["DiffusionGMMConfig", "diffusion_trainer", "irreducible_loss", "run"]
