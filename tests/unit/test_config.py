"""The service configuration and how it meets a deployment (cannonade/config.py, compose/):
what the engine would trip on later is refused when the file loads, naming the option; the
environment and docker-compose set what the containers need; external brokers are met as
operators list them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from cannonade.config import Config, load
from compose.kafka import _topic_config, first_address, replication_for
from schemas import topics


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"gate": {"perfetch": 3}}, "perfetch"),  # a misspelt gate knob was ignored
        ({"api": {"allowed_completion_windows": ["24h", "1w"]}}, "allowed_completion_windows"),
        ({"executor": {"max_in_flight": 0}}, "max_in_flight"),
        # a credential in the URL would be named in failed calls' error lines
        ({"models": {"m": {"upstream": "https://u:secret@llm.internal/v1"}}}, "api_key"),
        ({"models": {"m": {"upstream": "llm.internal:8000"}}}, "http"),
    ],
)
def test_a_configuration_the_engine_would_trip_on_later_is_refused_at_load(
    table: dict[str, Any], named: str
) -> None:
    with pytest.raises(msgspec.ValidationError, match=named):
        msgspec.convert(table, Config)


def test_the_api_address_can_come_from_the_environment_as_compose_sets_it() -> None:
    loaded = load({"CANNONADE_API_HOST": "0.0.0.0", "CANNONADE_API_PORT": "9000"})
    assert (loaded.api.host, loaded.api.port) == ("0.0.0.0", 9000)
    compose = yaml.safe_load((Path(__file__).parents[2] / "compose" / "docker-compose.yml").read_text())  # fmt: skip
    api = compose["services"]["api"]["environment"]
    assert api["CANNONADE_API_HOST"] == "0.0.0.0" and api["CANNONADE_API_PORT"] == "8080"
    assert api["CANNONADE_KAFKA"] == compose["services"]["gate"]["environment"]["CANNONADE_KAFKA"]


def test_external_brokers_are_probed_at_the_first_of_a_list_and_topics_get_three_copies() -> None:
    assert first_address("k1.internal:9092, k2.internal:9092") == ("k1.internal", "9092")
    assert first_address("127.0.0.1:29092") == ("127.0.0.1", "29092")
    assert [replication_for(n) for n in (0, 1, 2, 3, 5)] == [1, 1, 2, 3, 3]


def test_topics_created_with_three_copies_require_two_in_sync() -> None:
    for topic in topics.ALL:
        assert _topic_config(topic, 3)["min.insync.replicas"] == "2", topic.name
        # fewer copies keep the broker's default: a second required copy would stop every
        # write while one of two brokers is down
        assert "min.insync.replicas" not in _topic_config(topic, 2)
        assert "min.insync.replicas" not in _topic_config(topic, 1)


def test_the_image_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    root = Path(__file__).parents[2]
    copied = {
        line.split()[1]
        for line in (root / "compose" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    rules = [
        line
        for line in (root / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # everything is left out, then each copied path is let back in
    assert rules[0] == "*"
    assert {rule[1:] for rule in rules if rule.startswith("!")} == copied
