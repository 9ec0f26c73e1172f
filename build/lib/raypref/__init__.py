"""raypref: align text-to-image diffusion models with synthetic preferences, on Ray."""

__version__ = "0.1.0"
