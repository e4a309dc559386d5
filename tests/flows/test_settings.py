"""The one settings object: environment names, defaults, derived values."""

from __future__ import annotations

import datetime as dt

from flows.settings import get_settings


def test_stale_run_threshold_from_the_environment(monkeypatch):
    monkeypatch.delenv("CXR_SCREEN_STALE_RUN_HOURS", raising=False)
    assert get_settings().stale_run_after == dt.timedelta(hours=6)
    monkeypatch.setenv("CXR_SCREEN_STALE_RUN_HOURS", "1.5")
    assert get_settings().stale_run_after == dt.timedelta(minutes=90)
    monkeypatch.setenv("CXR_SCREEN_STALE_RUN_HOURS", "0")
    assert get_settings().stale_run_after is None
    assert get_settings(stale_run_hours=2).stale_run_after == dt.timedelta(hours=2)


def test_fanout_settings_keep_their_variable_names(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_SCREEN_SPOOL_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_SCREEN_DEVICE_SLOT", "host-1/gpu0")
    monkeypatch.setenv("CXR_SCREEN_MANIFEST_SIZE", "512")
    s = get_settings()
    assert (s.spool_dir, s.device_slot, s.manifest_size) == (tmp_path, "host-1/gpu0", 512)
