"""Take the README's pictures of the status page: docs/status-page.png and -dark.png.

Run from the checkout with the test extras installed (`.venv/bin/python
scripts/status-page-screenshots.py`): the page's real files are served with a generated
``/status`` (tests/support/status_fixture.py, services renamed to look like a small shop) and
photographed by headless chromium, once in the light scheme and once in the dark one.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.browser import chromium, wait_for  # noqa: E402
from tests.support.status_fixture import (  # noqa: E402
    FixtureServer,
    history_document,
    status_document,
)

PICTURES = (("light", "docs/status-page.png"), ("dark", "docs/status-page-dark.png"))
NAMES = ["api", "auth", "cache", "db", "search", "web"]


def document() -> tuple[dict, dict]:
    status = status_document(len(NAMES), 3)
    for name, service in zip(NAMES, status["services"], strict=True):
        old = service["name"]
        service["name"] = name
        for instance in service["instances"]:
            instance["name"] = instance["name"].replace(old, name)
            instance["image"] = instance["image"].replace(old, name)
        for entry in service["published"]:
            entry["hostnames"] = [f"{name}.example.com"]
    status["services"][3]["state"] = "conflict"
    status["services"][3]["reason"] = "address 10.128.0.3:80 is held by service cache"
    status["services"][3]["instances_by_state"] = {"live": 3}
    return status, history_document(status)


def main() -> None:
    status, history = document()
    with FixtureServer(status, history) as server, chromium(1600, 1000) as driver:
        for scheme, path in PICTURES:
            driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia",
                {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
            )
            driver.get(server.url)
            wait_for(driver, lambda d: d.execute_script("return document.body.dataset.renders"),
                     15, "the first render")  # fmt: skip
            driver.save_screenshot(str(ROOT / path))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
