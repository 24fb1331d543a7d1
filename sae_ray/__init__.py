"""sae-ray: Ray-distributed hyperparameter sweeps for SAE-ception."""

__version__ = "0.1.0"
