"""Diffusion models: VP noise schedules, parameterisations, an exact Gaussian-mixture target and fast ODE samplers
(DDIM, DPM-Solver, DPM-Solver++, UniPC, DC-Solver, DPM-Solver-v3; adaptive RK45 as a reference), checked against
exact answers (tests/jaxalign/diffusion/); a small Flax noise-prediction network for vectors with its denoising loss
(`networks`: `VectorDenoiser`, `denoising_loss`, `model_fn`), a small UNet for 16x16 images (`unet`) and a
procedural image set of coloured shapes with a programmatic reward (`shapes`); preference objectives
(Diffusion-DPO, D3PO, Diffusion-DRO, SmPO, DenseDPO, PatchDPO, DSO) as pure functions of per-sample denoising
errors, registered in `DIFFUSION_OBJECTIVES` (`preference`); AdjointDPM's gradients through the probability-flow
ODE are in `adjoint` (import it as a module)."""
# unipc, dc_solver and dpm_solver_v3 import `samplers` and register their solvers in it: importing them here makes
# `samplers.sample(name, ...)` know every solver whichever module a user imports first.
from jaxalign.diffusion import dc_solver, dpm_solver_v3, unipc  # noqa: F401
from jaxalign.diffusion.networks import VectorDenoiser, denoising_loss, model_fn
from jaxalign.diffusion.preference import DIFFUSION_OBJECTIVES, DiffusionObjectiveSpec, diffusion_objective

__all__ = ["DIFFUSION_OBJECTIVES", "DiffusionObjectiveSpec", "VectorDenoiser", "denoising_loss",
           "diffusion_objective", "model_fn"]
