"""Debian's Chromium for the browser tests, driven by Playwright (never a browser of its own).

`scripts/test` installs Chromium when it is missing and it runs as root; otherwise the tests skip
with the reason here, and fail under CI, where the browser must be there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import CI

#: Where Debian's package puts it.
CHROMIUM = "/usr/bin/chromium"
#: Set to a directory (docs/dashboard) to keep the tests' screenshots there.
SCREENSHOTS = os.environ.get("TIDINGS_SCREENSHOTS")


def chromium() -> str:
    """The Chromium executable; skips the test (fails it under CI) when there is none."""
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found:
        return found
    reason = "no Chromium at /usr/bin/chromium: apt-get install chromium (scripts/test does, as root)"
    if CI:
        pytest.fail(f"{reason} (CI is set: it must be there)")
    pytest.skip(reason)


def keep(shot: Path) -> None:
    """Copy a screenshot to $TIDINGS_SCREENSHOTS when it is set (how docs/dashboard.md's are made)."""
    if SCREENSHOTS:
        target = Path(SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / shot.name)
