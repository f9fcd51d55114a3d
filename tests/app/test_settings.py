"""Settings come from CHARNN_* variables and reject nonsense at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.settings import Settings, get_settings


def test_defaults_are_sane() -> None:
    s = Settings()
    assert s.max_queued_jobs == 16
    assert s.job_threads == 2
    assert s.max_concurrent_jobs >= 1
    assert s.api_key is None
    assert s.cors_origins == []


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHARNN_MAX_QUEUED_JOBS", "3")
    monkeypatch.setenv("CHARNN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHARNN_CHECKPOINT_EVERY_S", "2.5")
    monkeypatch.setenv("CHARNN_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    monkeypatch.setenv("CHARNN_API_KEY", "s3cret")
    s = Settings()
    assert s.max_queued_jobs == 3
    assert s.data_dir == tmp_path
    assert s.checkpoint_every_s == 2.5
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_empty_api_key_means_no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARNN_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHARNN_MAX_QUEUED_JOBS", "-1"),
        ("CHARNN_MAX_QUEUED_JOBS", "many"),
        ("CHARNN_MAX_CONCURRENT_JOBS", "0"),
        ("CHARNN_JOB_THREADS", "0"),
        ("CHARNN_MAX_HIDDEN_SIZE", "0"),
        ("CHARNN_CHECKPOINT_EVERY_S", "0"),
        ("CHARNN_CHECKPOINT_EVERY_S", "nan"),
        ("CHARNN_MAX_TIME_LIMIT_S", "inf"),
        ("CHARNN_CORS_ORIGINS", "not json"),
    ],
)
def test_invalid_values_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    # Malformed JSON for a list field fails while parsing the source: SettingsError.
    with pytest.raises((ValidationError, SettingsError)):
        Settings()


def test_every_field_is_described() -> None:
    # The README settings table is generated from these descriptions.
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("CHARNN_MAX_QUEUED_JOBS", "5")
        first = get_settings()
        monkeypatch.setenv("CHARNN_MAX_QUEUED_JOBS", "6")
        assert get_settings() is first
        assert first.max_queued_jobs == 5
    finally:
        get_settings.cache_clear()
