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
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign import paths
from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.schedules import get_schedule
from jaxalign.rundir import RunDir, params_sha256
from rl import harness

SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("cosine", "constant")
IRREDUCIBLE_DRAWS = 400_000
BANDWIDTH = 0.5
T_END = 1e-3


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


@dataclasses.dataclass(frozen=True)
class DiffusionGMMConfig:
    seed: int = 0  # the PRNG key of the run: initialisation, training data and noise, x_T, exact samples
    steps: int = 10000  # Adam steps, each on `batch` fresh mixture samples
    batch: int = 512
    lr: float = 2e-3  # Adam's (peak) learning rate
    lr_schedule: str = "cosine"  # "cosine" (decay to 0 over the steps) or "constant"
    hidden: int = 128  # MLP width
    depth: int = 3  # Dense + SiLU layers
    embed: str = "time"  # the network's conditioning: "time" (1000 t) or "logsnr" (lambda_t)
    schedule: str = "linear"  # "linear" (Song et al. 2021 VP) or "cosine" (Nichol and Dhariwal 2021)
    t_min: float = 1e-3  # training times t ~ U(t_min, t_max)
    num_chunks: int = 10  # jitted scans the steps are split into; checkpoint, log and ETA after each (<= steps)
    nfes: str = "5,10,20"  # comma-separated NFE budgets of every solver
    solvers: str = "ddim,dpm_solver_2,dpm_solver_3,dpm_solver_pp_2m"  # comma-separated, from samplers.ORDERS
    samples: int = 2000  # samples per sampler for the MMD (and exact samples for the floor)
    show_progress: bool = True  # progress bar with rate and ETA on the terminal (never part of the result)

    def __post_init__(self):
        positive = {"steps": self.steps, "batch": self.batch, "hidden": self.hidden, "depth": self.depth}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be a positive integer, got {key}={value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got lr={self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got lr_schedule={self.lr_schedule!r}")
        if self.embed not in networks.EMBEDDINGS:
            raise ValueError(f"embed must be one of {networks.EMBEDDINGS}, got embed={self.embed!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={self.schedule!r}")
        t_max = get_schedule(self.schedule).t_max
        if not 0.0 < self.t_min < t_max:
            raise ValueError(f"t_min must lie in (0, t_max={t_max}), got t_min={self.t_min!r}")
        if not 1 <= self.num_chunks <= self.steps:
            raise ValueError(f"num_chunks must lie in [1, steps={self.steps}], got num_chunks={self.num_chunks!r}")
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2 (the MMD's U-statistic), got samples={self.samples!r}")
        try:
            nfes = _parse_ints(self.nfes)
        except ValueError:
            raise ValueError(f"nfes must be comma-separated positive integers, got nfes={self.nfes!r}") from None
        if any(n < 1 for n in nfes):
            raise ValueError(f"nfes must be comma-separated positive integers, got nfes={self.nfes!r}")
        solvers = self.solver_names
        unknown = [s for s in solvers if s not in samplers.ORDERS]
        if unknown or not solvers:
            raise ValueError(f"solvers must be comma-separated names from {sorted(samplers.ORDERS)}, got "
                             f"solvers={self.solvers!r}")
        for solver in solvers:
            need = 2 if solver == "dpm_solver_pp_2m" else samplers.ORDERS[solver]
            if min(nfes) < need:
                raise ValueError(f"{solver} needs an NFE of at least {need}, got nfes={self.nfes!r}")

    @property
    def nfe_list(self) -> tuple[int, ...]:
        return _parse_ints(self.nfes)

    @property
    def solver_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.solvers.split(",") if s.strip())


def make_network(cfg: DiffusionGMMConfig, schedule) -> networks.VectorDenoiser:
    return networks.VectorDenoiser(hidden=cfg.hidden, depth=cfg.depth, embed=cfg.embed,
                                   schedule=schedule if cfg.embed == "logsnr" else None)


def init_params(cfg: DiffusionGMMConfig, schedule, key):
    dim = gmm.mixture_2d().dim
    return make_network(cfg, schedule).init(key, jnp.zeros((1, dim)), jnp.ones((1,)))


def diffusion_trainer(cfg: DiffusionGMMConfig, schedule, mix) -> harness.Trainer:
    """The denoiser's training for the harness: state {params, opt_state, key, step}, all replicated; one Adam
    step per update on fresh mixture samples; metrics loss and grad_norm (watched for divergence)."""
    apply_fn = make_network(cfg, schedule).apply
    lr = optax.cosine_decay_schedule(cfg.lr, cfg.steps) if cfg.lr_schedule == "cosine" else cfg.lr
    optimizer = optax.adam(lr)

    def init(key):
        k_init, k_run = jax.random.split(key)
        params = init_params(cfg, schedule, k_init)
        return {"params": params, "opt_state": optimizer.init(params), "key": k_run,
                "step": jnp.zeros((), jnp.int32)}

    def update(state):
        key, k_data, k_loss = jax.random.split(state["key"], 3)
        x0 = gmm.sample(mix, k_data, cfg.batch)
        loss, grads = jax.value_and_grad(
            lambda p: networks.denoising_loss(apply_fn, p, schedule, x0, k_loss, cfg.t_min))(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "key": key,
               "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def postfix(records):
        return {"loss": f"{np.mean([r['loss'] for r in records[-50:]]):.4f}"}

    # The progress bar counts Adam steps (the harness's "environment steps" per update: here 1).
    return harness.Trainer(init=init, update=update, num_updates=cfg.steps, env_steps_per_update=1, postfix=postfix)


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
