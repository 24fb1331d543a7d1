from sae_ray.cli import entrypoint

entrypoint()
