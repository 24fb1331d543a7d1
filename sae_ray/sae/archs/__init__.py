"""SAE architectures, one file each, registered by name (the way SAELens registers its SAE
classes): `architecture(name)` is what the model, the loss and the SAELens export ask.
Adding one is a file with an `@register`ed `Architecture` and its import below; a sweep
YAML reaches it once its name is in `config.sae.Architecture`."""

from sae_ray.sae.archs import batchtopk, jumprelu, matryoshka, topk  # noqa: F401 (register)
from sae_ray.sae.archs.base import ARCHITECTURES, Architecture, architecture, register

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "register"]
