"""One independent random stream per (experiment seed, cycle, purpose).

`seed + cycle` made seed s at cycle 1 replay seed s+1's cycle-0 streams, and one integer
drove the shuffle, the SAE's initialisation and the random targets alike. numpy's
`SeedSequence` hashes the whole tuple instead: no two (seed, cycle, purpose) share a stream,
and a new purpose never shifts the existing ones."""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np

Purpose = Literal["init", "finetune", "sae", "random_targets", "shuffle", "sae_order"]


def stream(seed: int, cycle: int, purpose: Purpose) -> int:
    """A 32-bit seed (for torch.manual_seed, numpy or a Generator) of this stream."""
    words = [seed, cycle, zlib.crc32(purpose.encode())]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
