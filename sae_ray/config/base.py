"""What every config section shares: unknown keys refused, assignments validated, and the
one error type a user sees (one line naming the field, exit 2)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user-facing config problem; the message is one line that names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
