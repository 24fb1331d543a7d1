"""The sweep YAML's schema, one validated, typed config: a researcher editing YAML needs
`sae.k: ...` and not a pydantic traceback. Every layer above reads it; it reads only
`storage` (to check a location).

`schema` holds the sections and the whole config, `sae` the one SAE config (also
train-sae's flags and the trainer's), `sharpening` and `strategies` the targets' rules,
`search` and `analysis` what is searched and what is tested, `loading` the YAML, the dotted
overrides and the one-line errors, `reference` the generated docs/configuration.md."""

from sae_ray.config.base import ConfigError, Section
from sae_ray.config.loading import (
    anchor_paths,
    apply_params,
    get_dotted,
    load,
    local_path_or_name,
    one_line,
    parse_override,
    set_dotted,
    validate,
)
from sae_ray.config.sae import PER_SAE, SHUFFLE_BUFFER_TOKENS, Sae
from sae_ray.config.schema import (
    Config,
    Cycles,
    Dataset,
    Experiment,
    Model,
    Resources,
    Wandb,
    sharpens,
)
from sae_ray.config.search import Constraint, Objective, Search, SpaceEntry
from sae_ray.config.sharpening import Sharpening
from sae_ray.config.strategies import CONTROL, effective_strategy

__all__ = [
    "CONTROL",
    "PER_SAE",
    "SHUFFLE_BUFFER_TOKENS",
    "Config",
    "ConfigError",
    "Constraint",
    "Cycles",
    "Dataset",
    "Experiment",
    "Model",
    "Objective",
    "Resources",
    "Sae",
    "Search",
    "Section",
    "Sharpening",
    "SpaceEntry",
    "Wandb",
    "anchor_paths",
    "apply_params",
    "effective_strategy",
    "get_dotted",
    "load",
    "local_path_or_name",
    "one_line",
    "parse_override",
    "set_dotted",
    "sharpens",
    "validate",
]
