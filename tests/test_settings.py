"""Settings: the only reader of EXECBOX_* variables, and the README's table of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from execbox.settings import Settings, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_settings_table_is_the_generated_one() -> None:
    text = README.read_text()
    start, end = "<!-- settings:start -->\n", "<!-- settings:end -->"
    assert start in text and end in text
    documented = text.split(start, 1)[1].split(end, 1)[0]
    assert documented == settings_table(), "regenerate it from execbox.settings.settings_table()"


def test_every_setting_is_described() -> None:
    assert [name for name, f in Settings.model_fields.items() if not f.description] == []


def test_service_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECBOX_ENGINE_URL", "tcp://127.0.0.1:2375")
    monkeypatch.setenv("EXECBOX_POOL_MIN_READY", "5")
    monkeypatch.setenv("EXECBOX_VOLUME_QUOTA", str(64 << 20))
    monkeypatch.setenv("EXECBOX_DATA_DIR", "/srv/execbox")
    s = Settings()
    assert (s.engine_url, s.pool_min_ready, s.volume_quota) == ("tcp://127.0.0.1:2375", 5, 64 << 20)
    assert s.session_store() == s.state_store() == "sqlite:////srv/execbox/state.db"
