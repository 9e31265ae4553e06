"""Where the database URL comes from: the option, the environment, or the embedded default."""

from __future__ import annotations

import pytest

from streamflow.config import EMBEDDED_DATABASE_URL, Settings, resolve_database_url

PG = "postgresql://app@db.internal:5432/app"


def test_embedded_default_when_nothing_is_set() -> None:
    choice = resolve_database_url(None, Settings())
    assert choice.url == "sqlite:///./streamflow.db" == EMBEDDED_DATABASE_URL
    assert choice.embedded is True
    assert choice.source == "default"


def test_embedded_default_without_settings_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMFLOW_DATABASE_URL", PG)
    assert resolve_database_url().embedded is True


def test_environment_variable_is_read_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFLOW_DATABASE_URL", PG)
    monkeypatch.setenv("STREAMFLOW_REDIS_URL", "redis://localhost:6379/0")
    settings = Settings()
    assert settings.database_url == PG
    assert settings.redis_url == "redis://localhost:6379/0"
    choice = resolve_database_url(None, settings)
    assert (choice.url, choice.embedded, choice.source) == (PG, False, "environment")


def test_explicit_option_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFLOW_DATABASE_URL", PG)
    choice = resolve_database_url("sqlite:////tmp/other.db", Settings())
    assert (choice.url, choice.embedded, choice.source) == (
        "sqlite:////tmp/other.db",
        False,
        "option",
    )


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_values_count_as_unset(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("STREAMFLOW_DATABASE_URL", blank)
    choice = resolve_database_url(blank, Settings())
    assert choice.embedded is True
    assert choice.url == EMBEDDED_DATABASE_URL


def test_unset_settings_are_none() -> None:
    settings = Settings()
    assert settings.database_url is None
    assert settings.redis_url is None


def test_unrelated_streamflow_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMFLOW_SOMETHING_ELSE", "x")
    assert Settings().database_url is None
