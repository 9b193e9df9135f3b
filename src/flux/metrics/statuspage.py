"""The status page: the static files behind ``/`` on ``-listen-prometheus``, and their headers.

Theory of operation
-------------------
The page is three static files shipped as package data in ``flux/metrics/page/``
(``index.html``, ``app.js``, ``style.css``): no template, no server-side rendering, nothing
fetched from elsewhere.  The browser loads them once and then reads the same JSON as ``curl``
(``/status``, ``/status/history``) every two seconds, building and updating the DOM itself, so
a page open for hours costs fluxd one ``/status`` per refresh and the new history samples of the
few dozen services it charts (those on screen), nothing else.

Safety rests on the headers, not on care in each line: every page file is served with a strict
``Content-Security-Policy`` (:data:`CONTENT_SECURITY_POLICY`: scripts and styles from this
origin only, no inline code, no plug-ins, no frames, requests only to this origin), with
``X-Content-Type-Options: nosniff`` so a file is only ever what its type says, and with
``Cache-Control: no-cache`` so a browser revalidates after fluxd is upgraded.  The script writes
every string from the JSON through ``textContent`` (never as markup), so a container label such
as ``<img src=x onerror=alert(1)>`` shows as that text; were one to slip through, the policy
would still refuse to run it.  The routes are GET only: the page changes nothing.

The files are read once, at the first request, from the installed package
(:mod:`importlib.resources`), so the wheel and the image serve what the source tree holds.

Compression (:func:`compress`, used by every route of the listener): gzip whenever the client
accepts it.  aiohttp's own choice takes the first of deflate, gzip it finds in
``Accept-Encoding``, so a browser (``gzip, deflate, br, zstd``) would get deflate, the coding
whose framing clients have disagreed on (zlib-wrapped or raw) and that the README does not
promise; gzip is what every client decodes the same way.  A client that accepts only deflate
still gets deflate, one that accepts neither gets the bytes as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PAGE_FILES",
    "PageFile",
    "accepts_gzip",
    "add_page_routes",
    "compress",
]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class PageFile:
    """One file of the page: the route it is served at, its name in the package, its type."""

    route: str
    name: str
    content_type: str


PAGE_FILES = (
    PageFile("/", "index.html", "text/html"),
    PageFile("/page/app.js", "app.js", "text/javascript"),
    PageFile("/page/style.css", "style.css", "text/css"),
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip (named, and not with ``q=0``)."""
    for part in accept_encoding.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def compress(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Compress ``response`` for ``request``'s client: gzip when it accepts it, else what
    aiohttp picks from its ``Accept-Encoding`` (deflate, or nothing)."""
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        response.enable_compression(web.ContentCoding.gzip)
    else:
        response.enable_compression()


def _handler(page_file: PageFile) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of one page file; the bytes are read from the package on first use."""
    body: list[bytes] = []

    async def serve(request: web.Request) -> web.Response:
        if not body:
            page = resources.files("flux.metrics").joinpath("page")
            body.append(page.joinpath(page_file.name).read_bytes())
        response = web.Response(
            body=body[0], content_type=page_file.content_type, charset="utf-8", headers=_HEADERS
        )
        compress(request, response)
        return response

    return serve


def add_page_routes(router: web.UrlDispatcher) -> None:
    """Serve the page's files (GET only) on ``router``."""
    for page_file in PAGE_FILES:
        router.add_get(page_file.route, _handler(page_file))
