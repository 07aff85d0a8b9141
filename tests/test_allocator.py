"""``storage.allocator.tune_malloc``: glibc takes the settings, children inherit them
through the environment, an operator's own setting wins, and the CLI applies them as
``malloc_tuning`` says."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from storage.allocator import malloc_env, tune_malloc
from streamrec.cli import _settings


def test_glibc_takes_the_settings_and_children_inherit_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in malloc_env():
        monkeypatch.delenv(name, raising=False)
    assert tune_malloc() is True  # this machine's Python runs on glibc
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['MALLOC_TOP_PAD_'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == str(64 << 20)


def test_an_operators_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in malloc_env():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    assert tune_malloc() is True
    assert os.environ["MALLOC_TOP_PAD_"] == "1048576"
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(128 << 20)


def test_in_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in malloc_env():
        monkeypatch.delenv(name, raising=False)
    tune_malloc(children=False)
    assert not any(name in os.environ for name in malloc_env())


@pytest.mark.parametrize("setting", ["true", "false"])
def test_the_cli_tunes_as_configured(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    for name in malloc_env():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STREAMREC_MALLOC_TUNING", setting)
    settings = _settings(argparse.Namespace(config=None, command="train"))
    assert settings.malloc_tuning is (setting == "true")
    assert ("MALLOC_TOP_PAD_" in os.environ) is (setting == "true")
