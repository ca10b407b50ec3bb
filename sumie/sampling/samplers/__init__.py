"""Sampler functions ``sample_x(model, x, sigmas, *, callback=None, noise_sampler=None, **options) -> x0``.

Import them from their modules (ode, ancestral, sde, ddim, plms, unipc, lcm) or look them up by name in
``sumie.sampling.registry``.
"""
