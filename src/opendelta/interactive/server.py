"""A local web page to pick the modules a delta goes on by clicking the collapsed model tree.

The server listens on 127.0.0.1 only, and every request must carry the per-session token that is
in the printed URL (else 403). Requests for another host name (a DNS-rebinding page) get 421, and
requests sent by a page of another origin get 403. ``OPENDELTA_SELECTOR_HOST=0.0.0.0`` (or
``host="0.0.0.0"``) listens on every interface as the original OpenDelta did, for a model on a
remote machine: any host name is then answered, the token is still required.

It serves one static page, the tree (``bigmodelvis`` to_dict), and answers selections with the
exact patterns they compress to; Submit hands them to the waiting ``select_modules`` call and stops
the server. Idle connections are closed after IDLE_TIMEOUT_S, and request bodies are bounded in
size and JSON nesting depth.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from torch import nn

from bigmodelvis import Visualization
from opendelta.addressing import find_modules
from opendelta.errors import NoMatchError, SelectionCancelled, SelectionError, SelectionTimeout
from opendelta.interactive.patterns import SelectionCompressor

PAGE = Path(__file__).with_name("page.html")
LOCAL = "127.0.0.1"
#: the one-line opt-in to the original OpenDelta's binding: OPENDELTA_SELECTOR_HOST=0.0.0.0
HOST_ENV = "OPENDELTA_SELECTOR_HOST"
MAX_BODY = 16 * 1024 * 1024
#: deepest JSON nesting a request body may have (a selection needs 2: an object holding a list)
MAX_JSON_DEPTH = 32
#: seconds a connection may stay silent before the server closes it and frees its thread
IDLE_TIMEOUT_S = 10.0
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def select_modules(
    model: nn.Module,
    port: int | None = None,
    timeout: float | None = 600.0,
    open_browser: bool = True,
    on_ready: Callable[[str], None] | None = None,
    host: str | None = None,
) -> list[str]:
    """Let the user pick modules of `model` on a local web page; return the submitted patterns.

    The page is served on 127.0.0.1 at `port` (a free one when None; `host`, else the environment
    variable OPENDELTA_SELECTOR_HOST, chooses another address: ``"0.0.0.0"`` is every interface,
    as the original OpenDelta listened), its URL (with a secret token) is printed, handed to `on_ready`, and opened in a browser when `open_browser` and one
    is registered. Returns the patterns that address exactly the clicked modules
    (``find_modules(model, result)`` gives them back). Raises SelectionTimeout after `timeout`
    seconds (None waits forever), SelectionCancelled on the page's Cancel or Ctrl-C, and
    SelectionError when the port cannot be used.
    """
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise SelectionError(f"port must be an integer in 0..65535 or None (a free port), got {port!r}.")
    if timeout is not None and not timeout > 0:
        raise SelectionError(f"timeout must be a positive number of seconds or None, got {timeout!r}.")
    if host is None:
        host = os.environ.get(HOST_ENV, "").strip() or LOCAL
    if not isinstance(host, str) or not host:
        raise SelectionError(f"host must be an address to listen on, such as {LOCAL!r} or '0.0.0.0', got {host!r}.")
    session = _Session(model)
    try:
        server = _Server((host, port or 0), session)
    except (OSError, OverflowError) as exc:
        raise SelectionError(
            f"Cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}. "
            "Pass another port, or None to let the system pick a free one."
        ) from None
    shown = LOCAL if host == LOCAL else socket.gethostname()
    url = f"http://{shown}:{server.server_address[1]}/?token={session.token}"
    if host != LOCAL:
        print(f"The selector listens on {host} (every machine that reaches this one can connect; the token in "
              "the URL is still required). Replace the host name in the URL by this machine's address if needed.",
              file=sys.stderr, flush=True)
    thread = threading.Thread(target=server.serve_forever, name="opendelta-select", daemon=True)
    thread.start()
    try:
        print(f"Select modules at {url}  (Ctrl-C to cancel)", file=sys.stderr, flush=True)
        if on_ready is not None:
            on_ready(url)
        if open_browser:
            _open_in_browser(url)
        finished = _wait(session.done, timeout)
    except KeyboardInterrupt:
        raise SelectionCancelled("Module selection interrupted (Ctrl-C); no modules were selected.") from None
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    if not finished:
        raise SelectionTimeout(
            f"No modules were submitted within {timeout:g} s, so the selection page was closed. "
            "Call again with a larger timeout (or timeout=None to wait without limit)."
        )
    if session.result is None:
        raise SelectionCancelled("Module selection was cancelled on the page; no modules were selected.")
    return session.result


def _wait(event: threading.Event, timeout: float | None) -> bool:
    """Wait for `event` in short slices, so Ctrl-C is noticed promptly on every platform."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
        if remaining <= 0:
            return event.is_set()
        if event.wait(remaining):
            return True


def _open_in_browser(url: str) -> None:
    """Open `url` in a graphical browser if one is registered; console browsers would take the terminal."""
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return
    if isinstance(browser, webbrowser.GenericBrowser) and not isinstance(browser, webbrowser.BackgroundBrowser):
        return
    try:
        browser.open(url)
    except Exception:  # a broken browser setup must not break the selection: the URL is printed
        pass


class _Session:
    """What one selection needs: the model, its tree and path index, the token, and the outcome."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.token = secrets.token_urlsafe(24)
        self.compressor = SelectionCompressor.for_model(model)
        self.page = PAGE.read_bytes()
        self.tree = json.dumps(_tree(model)).encode()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.claimed = False
        self.result: list[str] | None = None

    def answer(self, body: Any) -> dict[str, Any]:
        """The compressed patterns of a posted selection; raises ValueError with the reason."""
        if not isinstance(body, dict) or not isinstance(body.get("paths"), list):
            raise ValueError('Send a JSON object {"paths": [module paths]}.')
        not_text = next((p for p in body["paths"] if not isinstance(p, str)), None)
        if not_text is not None:
            raise ValueError(f'"paths" must hold module paths as strings; got {json.dumps(not_text)}.')
        try:
            patterns = self.compressor.compress(body["paths"])
        except NoMatchError as exc:
            raise ValueError(str(exc)) from None
        count = len(set(body["paths"]))
        return {"patterns": patterns, "count": count, "python": f"modified_modules={python_list(patterns)}"}

    def submit(self, body: Any) -> dict[str, Any]:
        answer = self.answer(body)
        if not answer["patterns"]:
            raise ValueError("Select at least one module before submitting.")
        # re-check through the public matcher the delta will use
        if set(find_modules(self.model, answer["patterns"])) != set(body["paths"]):
            raise ValueError(f"The patterns {answer['patterns']} do not address exactly the selection; please report this.")
        self._claim(answer["patterns"])
        return answer

    def cancel(self, body: Any) -> dict[str, Any]:
        self._claim(None)
        return {}

    def _claim(self, result: list[str] | None) -> None:
        """Record the outcome once; the handler sets ``done`` after answering, so the page hears back."""
        with self.lock:
            if self.claimed:
                raise RuntimeError("This selection is already finished.")
            self.claimed = True
            self.result = result


def python_list(patterns: list[str]) -> str:
    """`patterns` as Python source, with raw strings for regexes so they read as typed."""
    items = []
    for p in patterns:
        raw = "\\" in p and '"' not in p and not p.endswith("\\")
        items.append(f'r"{p}"' if raw else repr(p))
    return "[" + ", ".join(items) + "]"


def _tree(model: nn.Module) -> dict[str, Any]:
    """The collapsed tree with every module (delta layers left out), trimmed to what the page shows."""

    def trim(node: dict[str, Any]) -> dict[str, Any]:
        children = [trim(c) for c in node["children"] if not c["is_delta"]]
        return {"name": node["name"], "class": node["class"], "paths": node["paths"], "numel": node["numel"],
                "children": children}

    return trim(Visualization(model, keep_non_params=True).to_dict())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # a page load opens several connections at once; the default of 5 drops some

    def __init__(self, address: tuple[str, int], session: _Session):
        self.session = session
        self.idle_timeout = IDLE_TIMEOUT_S
        super().__init__(address, _Handler)
        port = self.server_address[1]
        # the Host values a browser sends for this server; a port-80 server is also reached without ":80".
        # Listening beyond loopback (an opt-in) any name may reach it: None, the token guards it alone
        names = ("127.0.0.1", "localhost")
        local = frozenset({f"{name}:{port}" for name in names} | (set(names) if port == 80 else set()))
        self.hosts: frozenset[str] | None = local if address[0] == LOCAL else None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser dropping a connection is not worth a traceback on the user's terminal."""


def _too_deep(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests lists and objects more than `limit` levels deep (without recursing)."""
    level = [value]
    for _ in range(limit):
        level = [child for v in level if isinstance(v, (list, dict))
                 for child in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return False
    return any(isinstance(v, (list, dict)) for v in level)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "opendelta-select"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the terminal shows only the URL and the result."""

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # read by StreamRequestHandler.setup: a socket timeout
        super().setup()

    def do_GET(self) -> None:
        route = self._route()
        if route == "/":
            self._send(HTTPStatus.OK, self.server.session.page, "text/html; charset=utf-8")
        elif route == "/tree":
            self._send(HTTPStatus.OK, self.server.session.tree, "application/json")
        elif route is not None:
            self._error(HTTPStatus.NOT_FOUND, f"No page {route!r} here.")

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        session = self.server.session
        actions = {"/compress": session.answer, "/submit": session.submit, "/cancel": session.cancel}
        if route not in actions:
            self._error(HTTPStatus.NOT_FOUND, f"No action {route!r} here.")
            return
        body = self._json_body()
        if body is None:
            return
        try:
            answer = actions[route](body)
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except RuntimeError as exc:
            self._error(HTTPStatus.CONFLICT, str(exc))
            return
        try:
            self._send(HTTPStatus.OK, json.dumps(answer).encode(), "application/json")
        finally:
            if route != "/compress":
                session.done.set()

    def _route(self) -> str | None:
        """The request path if the request is for this server, from its own page or no page, with the
        right token; else answer 421 or 403 and return None."""
        hosts = self.headers.get_all("Host") or []
        host = hosts[0].lower() if len(hosts) == 1 else None
        if host is None or (self.server.hosts is not None and host not in self.server.hosts):
            self._error(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"This server answers only requests for {' or '.join(sorted(self.server.hosts or ['one host name']))}, not Host "
                f"{', '.join(hosts) or '(none)'}: open the exact URL that was printed.",
            )
            return None
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            self._error(HTTPStatus.FORBIDDEN, f"Requests from the page {origin} are refused: use the page at the printed URL.")
            return None
        url = urlsplit(self.path)
        given = parse_qs(url.query).get("token", [""])[0]
        if not secrets.compare_digest(given.encode(), self.server.session.token.encode()):
            self._error(HTTPStatus.FORBIDDEN, "Missing or wrong token: open the exact URL that was printed.")
            return None
        return url.path

    def _json_body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Send a Content-Length header.")
            return None
        if not 0 <= length <= MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The body must be at most {MAX_BODY} bytes.")
            return None
        too_deep = f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep."
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except RecursionError:  # nesting deeper than Python's recursion limit
            self._error(HTTPStatus.BAD_REQUEST, too_deep)
            return None
        except ValueError as exc:  # invalid JSON or UTF-8, or an integer of more digits than Python converts
            self._error(HTTPStatus.BAD_REQUEST, f"The body is not valid JSON: {exc}.")
            return None
        if _too_deep(body, MAX_JSON_DEPTH):
            self._error(HTTPStatus.BAD_REQUEST, too_deep)
            return None
        return body

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
