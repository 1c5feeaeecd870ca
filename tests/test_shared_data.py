"""The ``shared`` fixture's rule: missing sample data skips a test locally and fails it under CI=true."""

from __future__ import annotations

import pytest
from _shared import shared_data


@pytest.mark.parametrize("ci", ["true", "True", "1"])
def test_missing_shared_data_fails_under_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"nowhere is not beside this checkout; under CI=true"):
        shared_data(tmp_path / "nowhere")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_shared_data_skips_elsewhere(tmp_path, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=r"nowhere is not beside this checkout$"):
        shared_data(tmp_path / "nowhere")


def test_present_shared_data_is_returned_whatever_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert shared_data(tmp_path) == tmp_path
