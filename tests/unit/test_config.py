"""The service configuration (cannonade/config.py): what the engine would trip on later is
refused when the file loads, naming the option."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cannonade.config import Config


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"gate": {"perfetch": 3}}, "perfetch"),  # a misspelt gate knob was ignored
        ({"api": {"allowed_completion_windows": ["24h", "1w"]}}, "allowed_completion_windows"),
        ({"executor": {"max_in_flight": 0}}, "max_in_flight"),
    ],
)
def test_a_configuration_the_engine_would_trip_on_later_is_refused_at_load(
    table: dict[str, Any], named: str
) -> None:
    with pytest.raises(msgspec.ValidationError, match=named):
        msgspec.convert(table, Config)
