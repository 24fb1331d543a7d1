"""Hookpoints by module name: sparsify's glob patterns over the base model's modules
(`h.*.mlp`, `layers.*.self_attn`), each module's output or, with the `:input` suffix, its
input, all captured in one forward pass.

A block's hookpoint is its module path (`models.hookpoint`: `h.3`), so `--layers 3` and
`--hookpoints h.3` name the same activations."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase

import torch
from torch import nn

from sae_ray.lm.models import block_output, hookpoint

INPUT = ":input"  # the suffix of a hookpoint that reads its module's input


def module_of(point: str) -> tuple[str, bool]:
    """A hookpoint's module name, and whether it reads the module's input."""
    if point.endswith(INPUT):
        return point.removesuffix(INPUT), True
    return point, False


def source(point: str, transcode: bool) -> str:
    """The column an SAE at `point` reads: the point's own, or a transcoder's module input."""
    return point + INPUT if transcode else point


def columns(points: list[str], transcode: bool) -> list[str]:
    """Every column SAEs at `points` read, each once: a transcoder's input beside its
    output."""
    return list(dict.fromkeys(c for p in points for c in (source(p, transcode), p)))


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _natural(name: str) -> list:
    """h.2 before h.10 (sparsify's natsort order)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def matching(model: nn.Module, patterns: list[str]) -> list[str]:
    """The hookpoints `patterns` name, in natural order: every module of the base model whose
    name matches a pattern (fnmatch, case-sensitive, as sparsify), `:input` kept. ValueError
    naming a pattern that matches nothing, with the first block's modules as examples."""
    names = [name for name, _ in _base(model).named_modules() if name]
    out: list[str] = []
    for pattern in patterns:
        module, reads_input = module_of(pattern)
        hits = [n for n in names if fnmatchcase(n, module)]
        if not hits:
            first = hookpoint(model, 0)
            examples = [n for n in names if n == first or n.startswith(first + ".")][:8]
            raise ValueError(
                f"{pattern!r} matches no module of {type(model).__name__} (block 0's: "
                f"{', '.join(examples)}, ...)"
            )
        out += [n + INPUT if reads_input else n for n in hits]
    return sorted(dict.fromkeys(out), key=_natural)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's input: its first positional tensor, else the first tensor passed by name
    (`hidden_states=`)."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value
    raise ValueError("the module was called without a tensor input")


@contextlib.contextmanager
def hooked_points(model: nn.Module, points: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture each hookpoint's activation (graph kept) into the yielded dict, by name."""
    store: dict[str, torch.Tensor] = {}
    base, handles = _base(model), []
    for point in points:
        name, reads_input = module_of(point)

        def hook(_module, args, kwargs, output, point=point, reads_input=reads_input):
            store[point] = _first_tensor(args, kwargs) if reads_input else block_output(output)

        module = base.get_submodule(name)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def widths(model: nn.Module, points: list[str]) -> dict[str, int]:
    """Each hookpoint's width, from a forward pass over two tokens; ValueError naming one
    whose activation is not one vector per token (batch, tokens, width)."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    with hooked_points(model, points) as store:
        _base(model)(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = {}
    for point in points:
        if point not in store:
            raise ValueError(f"{point!r}: no forward pass runs this module (a container?)")
        shape = tuple(store[point].shape)
        if len(shape) != 3 or shape[:2] != (1, 2):
            raise ValueError(f"{point!r}: its activation is {shape}, not one vector per token")
        out[point] = shape[-1]
    return out
