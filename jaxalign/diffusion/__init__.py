"""Diffusion models: VP noise schedules, parameterisations, an exact Gaussian-mixture target and fast ODE samplers
(DDIM, DPM-Solver, DPM-Solver++), checked against exact answers (tests/jaxalign/diffusion/), and preference
objectives (Diffusion-DPO, D3PO, Diffusion-DRO, SmPO, DenseDPO, PatchDPO, DSO) as pure functions of per-sample
denoising errors, registered in `DIFFUSION_OBJECTIVES` (`preference`)."""
from jaxalign.diffusion.preference import DIFFUSION_OBJECTIVES, DiffusionObjectiveSpec, diffusion_objective

__all__ = ["DIFFUSION_OBJECTIVES", "DiffusionObjectiveSpec", "diffusion_objective"]
