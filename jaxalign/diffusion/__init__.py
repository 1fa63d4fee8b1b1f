"""Diffusion models: VP noise schedules, parameterisations, an exact Gaussian-mixture target and fast ODE samplers
(DDIM, DPM-Solver, DPM-Solver++), checked against exact answers (tests/jaxalign/diffusion/)."""
