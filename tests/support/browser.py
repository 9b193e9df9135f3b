"""Debian's chromium, headless, driven by Selenium through Debian's chromium-driver.

No browser or driver is downloaded: both paths are fixed (``make test`` installs the packages;
a missing one fails the test that needs it).  The browser's console is read with
``get_log("browser")``; :func:`console_errors` keeps the entries at level SEVERE, which is where
uncaught exceptions, failed loads and Content-Security-Policy refusals land.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "console_errors", "wait_for"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(width: int = 1500, height: int = 900) -> Iterator[WebDriver]:
    """A headless chromium window; quit afterwards."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            raise RuntimeError(f"{path} is missing: install chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-proxy-server", f"--window-size={width},{height}",
                     "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """The SEVERE console entries since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(
    driver: WebDriver,
    predicate: Callable[[WebDriver], object],
    timeout: float = 15.0,
    what: str = "",
) -> object:
    """Poll ``predicate(driver)`` until it is truthy; fail naming ``what`` after ``timeout``.

    An element the page replaced while the predicate looked at it counts as "not yet".
    """
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(predicate)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
