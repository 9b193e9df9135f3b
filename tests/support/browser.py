"""Debian's chromium, headless, driven by Selenium through Debian's chromium-driver.

No browser or driver is downloaded: both paths are fixed (``make test`` installs the packages;
a missing one fails the test that needs it).  The browser's console is read with
``get_log("browser")``; :func:`console_errors` keeps the entries at level SEVERE, which is where
uncaught exceptions, failed loads and Content-Security-Policy refusals land.  The DevTools
network events are logged too (``get_log("performance")``), so :func:`exchanges` can say which
headers went over the wire each way (the ``Accept-Encoding`` chromium sent, the
``Content-Encoding`` it got).

The status page's table is read with :func:`service_rows`, :func:`cell` and
:func:`instance_rows` (each a single script run, so a row the page replaces between two reads
cannot mix two refreshes), and its refreshes counted with :func:`renders`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "Exchange",
    "cell",
    "chromium",
    "console_errors",
    "exchanges",
    "instance_rows",
    "renders",
    "service_rows",
    "wait_for",
    "wait_renders",
]

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
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


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP exchange as chromium's network stack saw it (header names in lower case)."""

    url: str
    status: int
    sent: dict[str, str]
    received: dict[str, str]


def exchanges(driver: WebDriver) -> list[Exchange]:
    """The HTTP exchanges answered since the last call (reading the log empties it), with the
    request headers chromium put on the wire (``requestWillBeSentExtraInfo``)."""
    sent: dict[str, dict[str, str]] = {}
    answered: list[tuple[str, dict[str, object]]] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSentExtraInfo":
            headers = params.get("headers", {})
            sent[params["requestId"]] = {k.lower(): str(v) for k, v in headers.items()}
        elif message.get("method") == "Network.responseReceived":
            answered.append((params["requestId"], params["response"]))
    return [
        Exchange(
            url=str(response["url"]),
            status=int(str(response["status"])),
            sent=sent.get(request_id, {}),
            received={k.lower(): str(v) for k, v in dict(response["headers"]).items()},  # type: ignore[call-overload]
        )
        for request_id, response in answered
    ]


# -- the status page's table ----------------------------------------------------------------


def renders(driver: WebDriver) -> int:
    """How many refreshes the page has rendered (``document.body.dataset.renders``)."""
    return int(driver.execute_script("return document.body.dataset.renders || '0'"))


def wait_renders(driver: WebDriver, more_than: int = 0, timeout: float = 15.0) -> int:
    """Wait for render number ``more_than + 1`` (or later); the count then."""
    wait_for(driver, lambda d: renders(d) > more_than, timeout, f"render number {more_than + 1}")
    return renders(driver)


def service_rows(driver: WebDriver) -> dict[str, WebElement]:
    """The visible and hidden service rows (their <tbody>), by service name, read at once."""
    rows: dict[str, WebElement] = driver.execute_script(_SERVICE_ROWS)
    return rows


_SERVICE_ROWS = """
const rows = {};
for (const tbody of document.querySelectorAll('tbody.svc')) {
  rows[tbody.querySelector('tr.service td.name .name').textContent] = tbody;
}
return rows;
"""


def cell(tbody: WebElement, name: str) -> str:
    """The text of the service row's cell of class ``name`` (``req``, ``state``, ...)."""
    found = tbody.find_element(By.CSS_SELECTOR, f"tr.service td.{name}")
    return str(found.get_attribute("textContent"))


def instance_rows(tbody: WebElement) -> dict[str, list[str]]:
    """Instance name -> the texts of its row's cells, read at once."""
    rows: dict[str, list[str]] = tbody.parent.execute_script(_INSTANCE_ROWS, tbody)
    return rows


_INSTANCE_ROWS = """
const rows = {};
for (const tr of arguments[0].querySelectorAll('tr.instance')) {
  rows[tr.querySelector('.name').textContent] = [...tr.cells].map((td) => td.textContent);
}
return rows;
"""
