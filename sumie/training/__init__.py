"""Training: datasets, VAE and diffusion training loops, the embedded tiny model."""
