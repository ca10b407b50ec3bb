"""Sampling: discretization (noise schedule of training), schedules (sigmas to visit), denoisers, guidance, samplers.

Conventions (k-diffusion's): a *model* is ``model(x, sigma) -> denoised`` with x [B, C, H, W] and sigma [B];
samplers are plain functions ``sample_x(model, x, sigmas, *, callback=None, noise_sampler=None, ...)``;
schedules return sigmas ending in 0; random noise always comes in from outside (``noise_sampler``).
"""
