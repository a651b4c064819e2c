"""The dashboard: GET / serves dashboard.html as it is, under a Content-Security-Policy built from it.

The page is one static file with one inline <style> and one inline <script>. The policy allows those two by
their sha256 hashes (computed here, at start, from the file) and requests to this service only, so nothing
else can run or load on the page, whatever ends up in a run's input, result or log lines.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

PAGE = (Path(__file__).resolve().parent / "dashboard.html").read_bytes()


def inline_hash(page: str, tag: str) -> str:
    """The CSP source for the page's one inline ``<tag>`` element, hashed as the browser hashes it."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    if len(found) != 1:
        raise ValueError(f"dashboard.html must have exactly one inline <{tag}>, found {len(found)}")
    text = found[0].replace("\r\n", "\n").replace("\r", "\n")  # the HTML parser normalises line ends first
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_policy(page: str) -> str:
    """The dashboard's Content-Security-Policy: its own style and script, and fetch() to this service."""
    return (f"default-src 'none'; script-src {inline_hash(page, 'script')}; style-src {inline_hash(page, 'style')}; "
            "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


HEADERS = {
    "Content-Security-Policy": page_policy(PAGE.decode()),
    "Cache-Control": "no-cache",  # a new release's page is fetched, not an old one from the cache
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


ROOT_PATH_META = b'<meta name="root-path" content="">'
if PAGE.count(ROOT_PATH_META) != 1:
    raise ValueError("dashboard.html must have exactly one empty root-path <meta>")


@functools.cache
def page_under(root_path: str) -> bytes:
    """The page with the path prefix its requests take (outside the hashed script: the policy stays the same)."""
    return PAGE.replace(ROOT_PATH_META, b'<meta name="root-path" content="%s">' % html.escape(root_path).encode())


async def dashboard(request: Request) -> Response:
    root_path = request.scope.get("root_path", "")
    return Response(page_under(root_path) if root_path else PAGE, media_type="text/html; charset=utf-8",
                    headers=HEADERS)
