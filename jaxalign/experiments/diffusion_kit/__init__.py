"""What the diffusion experiments on the exact 2-D Gaussian mixture share: the base model's config
(`DiffusionGMMConfig`), its network (`make_network`, `init_params`) and its training on the RL harness
(`diffusion_trainer`), moved here from `jaxalign.experiments.diffusion_gmm` unchanged (an experiment never imports
another experiment: tests/test_layers.py), so `diffusion_gmm` and `diffusion_preference` train the same base model.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.diffusion import gmm, networks, samplers
from jaxalign.diffusion.schedules import get_schedule
from rl import harness

SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("cosine", "constant")
BANDWIDTH = 0.5
T_END = 1e-3


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def check_training_fields(cfg) -> None:
    """The base-model config checks the vector and image bases share: the noise schedule, t_min inside it and the
    number of chunks (one ValueError naming the field and its value)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={cfg.schedule!r}")
    t_max = get_schedule(cfg.schedule).t_max
    if not 0.0 < cfg.t_min < t_max:
        raise ValueError(f"t_min must lie in (0, t_max={t_max}), got t_min={cfg.t_min!r}")
    if not 1 <= cfg.num_chunks <= cfg.steps:
        raise ValueError(f"num_chunks must lie in [1, steps={cfg.steps}], got num_chunks={cfg.num_chunks!r}")


@dataclasses.dataclass(frozen=True)
class DiffusionGMMConfig:
    seed: int = 0  # the PRNG key of the run: initialisation, training data and noise, x_T, exact samples
    steps: int = 10000  # Adam steps, each on `batch` fresh mixture samples
    batch: int = 512  # fresh exact mixture samples per Adam step
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
        check_training_fields(self)
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


def denoiser_trainer(apply_fn, init_params_fn, draw_x0, schedule, *, steps: int, lr: float, lr_schedule: str,
                     t_min: float, loss_format: str = ".4f") -> harness.Trainer:
    """A denoiser's training for the harness, shared by the vector and the image base models: state {params,
    opt_state, key, step}, all replicated; one Adam step (constant or cosine-decayed `lr`) per update on
    `draw_x0(key)` fresh data with `networks.denoising_loss`; metrics loss and grad_norm (watched for divergence).
    `init_params_fn(key)` initialises the network; the progress bar counts Adam steps (1 "environment step" per
    update) and shows the recent loss in `loss_format`."""
    schedule_lr = optax.cosine_decay_schedule(lr, steps) if lr_schedule == "cosine" else lr
    optimizer = optax.adam(schedule_lr)

    def init(key):
        k_init, k_run = jax.random.split(key)
        params = init_params_fn(k_init)
        return {"params": params, "opt_state": optimizer.init(params), "key": k_run,
                "step": jnp.zeros((), jnp.int32)}

    def update(state):
        key, k_data, k_loss = jax.random.split(state["key"], 3)
        x0 = draw_x0(k_data)
        loss, grads = jax.value_and_grad(
            lambda p: networks.denoising_loss(apply_fn, p, schedule, x0, k_loss, t_min))(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "key": key,
               "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def postfix(records):
        return {"loss": format(np.mean([r["loss"] for r in records[-50:]]), loss_format)}

    return harness.Trainer(init=init, update=update, num_updates=steps, env_steps_per_update=1, postfix=postfix)


def diffusion_trainer(cfg: DiffusionGMMConfig, schedule, mix) -> harness.Trainer:
    """The vector denoiser's training on fresh mixture samples (`denoiser_trainer`)."""
    return denoiser_trainer(make_network(cfg, schedule).apply, lambda key: init_params(cfg, schedule, key),
                            lambda key: gmm.sample(mix, key, cfg.batch), schedule, steps=cfg.steps, lr=cfg.lr,
                            lr_schedule=cfg.lr_schedule, t_min=cfg.t_min)


def mmd2_between(x, y, bandwidth: float = BANDWIDTH):
    """Unbiased squared MMD (Gretton et al. 2012, eq. 3, the U-statistic) between samples x (n, d) and y (m, d),
    Gaussian kernel exp(-|a - b|^2 / (2 bandwidth^2)); x and y must be independent draws (its expectation is 0
    when they come from the same law, so it can be slightly negative)."""
    def gram(a, b):
        return jnp.exp(-jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1) / (2.0 * bandwidth**2))

    n, m = x.shape[0], y.shape[0]
    kxx = (jnp.sum(gram(x, x)) - n) / (n * (n - 1))
    kyy = (jnp.sum(gram(y, y)) - m) / (m * (m - 1))
    return kxx + kyy - 2.0 * jnp.mean(gram(x, y))


__all__ = ["BANDWIDTH", "DiffusionGMMConfig", "LR_SCHEDULES", "SCHEDULES", "T_END", "check_training_fields",
           "denoiser_trainer", "diffusion_trainer", "init_params", "make_network", "mmd2_between"]
