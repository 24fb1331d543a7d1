from sae_ray.cli.main import entrypoint

entrypoint()
