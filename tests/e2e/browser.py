"""A headless Chromium for the browser tests: Debian's ``/usr/bin/chromium`` driven by Playwright.

Playwright's own browser downloads are never used (``playwright install`` needs the internet): the pip
wheel brings the driver, ``make browser`` installs Debian's ``chromium``. Without either, a test that
asks for a browser fails under ``CI=true`` (a CI that silently skips its browser test has no browser
test) and is skipped with the reason elsewhere.

Screenshots are test artifacts: written under ``$REINDEX_TEST_ARTIFACTS`` if set, else under
``/tmp/reindex-test-artifacts/``, one fresh directory per test.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
# No GPU, no sandbox (containers run as root), and nothing that talks to the internet on its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}


def in_ci() -> bool:
    """``CI`` set to a true value (GitHub Actions, GitLab and most CIs set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_browser() -> None:
    """Fail (under CI) or skip (elsewhere) unless Playwright and ``/usr/bin/chromium`` are both there."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        missing.append(f"the Python package playwright ({e}; it is pinned in requirements.txt)")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (Debian's chromium: `make browser` installs it)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if in_ci():
            pytest.fail(f"{reason}; CI=true: a missing browser fails the test, it is never skipped")
        pytest.skip(reason)


def artifacts_dir(name: str) -> Path:
    """A fresh directory for one test's screenshots: ``$REINDEX_TEST_ARTIFACTS/<name>-<time>``."""
    root = Path(os.environ.get("REINDEX_TEST_ARTIFACTS") or "/tmp/reindex-test-artifacts")
    path = root / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium_page(*, timeout_ms: float = 30_000) -> Iterator[Page]:
    """One page of a fresh headless Chromium (its own temporary profile, deleted afterwards).

    ``timeout_ms`` is Playwright's default wait for every action and ``expect``: the UI's pages are
    rendered by React after API calls on a 2-core machine that also runs Airflow, hence generous.
    """
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=timeout_ms)
    with tempfile.TemporaryDirectory(prefix="rx-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT,
            locale="en-US", timezone_id="UTC", color_scheme="light")
        try:
            context.set_default_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
