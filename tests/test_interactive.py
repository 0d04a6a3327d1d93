"""The interactive selector: a token-guarded local server, and the page driven in real headless Chromium."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from torch import nn

from conftest import tiny_bert
from opendelta import LoraModel, SelectionCancelled, SelectionError, SelectionTimeout, find_modules
from opendelta.interactive import select_modules
from opendelta.interactive import server as selector_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists(),
    reason="browser tests need the playwright pip package and /usr/bin/chromium (apt-get install chromium)",
)


class Selection:
    """``select_modules`` blocking in a worker thread, as it blocks a user's script."""

    def __init__(self, model: nn.Module, **kwargs):
        self.url = ""
        self.result: list[str] | None = None
        self.error: BaseException | None = None
        ready = threading.Event()

        def on_ready(url: str) -> None:
            self.url = url
            ready.set()

        def target() -> None:
            try:
                self.result = select_modules(model, open_browser=False, on_ready=on_ready, timeout=60, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the server never became ready"

    def call(self, path: str, body: object | None = None, token: str | None = None) -> tuple[int, dict]:
        """(status, JSON answer) of a GET (no body) or POST to the server."""
        return call(self.url, path, body, token)

    def outcome(self) -> list[str]:
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def call(url: str, path: str, body: object | None = None, token: str | None = None) -> tuple[int, dict]:
    parts = urlsplit(url)
    given = parse_qs(parts.query)["token"][0] if token is None else token
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{parts.netloc}{path}?token={given}", data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, (json.loads(raw) if raw.startswith(b"{") else {"html": raw.decode()})


# ----------------------------------------------------------------------- server


def test_the_url_is_on_localhost_and_carries_a_secret_token():
    selection = Selection(tiny_bert())
    url = urlsplit(selection.url)
    assert url.hostname == "127.0.0.1"
    assert len(parse_qs(url.query)["token"][0]) >= 32
    selection.call("/cancel", {})
    with pytest.raises(SelectionCancelled):
        selection.outcome()


def test_requests_without_the_right_token_are_forbidden():
    selection = Selection(tiny_bert())
    assert selection.call("/", token="")[0] == 403
    assert selection.call("/tree", token="wrong")[0] == 403
    assert selection.call("/submit", {"paths": ["pooler.dense"]}, token="")[0] == 403
    assert selection.call("/")[0] == 200
    selection.call("/cancel", {})
    with pytest.raises(SelectionCancelled):
        selection.outcome()


def test_submitting_an_unknown_module_is_a_bad_request_naming_it():
    selection = Selection(tiny_bert())
    status, answer = selection.call("/submit", {"paths": ["pooler.dense", "encoder.nope"]})
    assert status == 400
    assert "'encoder.nope'" in answer["error"]
    assert selection.call("/submit", {"paths": ["pooler.dense"]})[0] == 200
    assert selection.outcome() == ["pooler.dense"]


def test_submitting_nothing_is_a_bad_request():
    selection = Selection(tiny_bert())
    status, answer = selection.call("/submit", {"paths": []})
    assert (status, answer["error"]) == (400, "Select at least one module before submitting.")
    status, answer = selection.call("/submit", b"not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    selection.call("/cancel", {})
    with pytest.raises(SelectionCancelled):
        selection.outcome()


def test_the_live_answer_is_the_exact_compressed_list():
    selection = Selection(tiny_bert())
    paths = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    status, answer = selection.call("/compress", {"paths": paths})
    assert (status, answer) == (200, {"patterns": ["query"], "count": 2, "python": "modified_modules=['query']"})
    selection.call("/cancel", {})
    with pytest.raises(SelectionCancelled):
        selection.outcome()


def test_no_submission_before_the_timeout_raises_selection_timeout_and_frees_the_port():
    ports = []
    with pytest.raises(SelectionTimeout, match="within 0.3 s"):
        select_modules(tiny_bert(), timeout=0.3, open_browser=False, on_ready=lambda url: ports.append(urlsplit(url).port))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", ports[0]))


CTRL_C_CHILD = """
import signal
import sys
from torch import nn
from opendelta import SelectionCancelled
from opendelta.interactive import select_modules

# as in a terminal: a launcher running us in the background (CI) may have set SIGINT to be ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    select_modules(nn.Sequential(nn.Linear(2, 2)), timeout=60, open_browser=False,
                   on_ready=lambda url: print("ready", flush=True))
except SelectionCancelled as exc:
    print("cancelled:", exc, flush=True)
    sys.exit(3)
"""


def test_ctrl_c_raises_selection_cancelled():
    # a real SIGINT to a real process, as a terminal's Ctrl-C sends it
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 3, err
    assert "cancelled: Module selection interrupted (Ctrl-C)" in out
    assert "Traceback" not in err


def test_a_busy_port_raises_selection_error_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SelectionError, match=f"127.0.0.1:{port}"):
            select_modules(tiny_bert(), port=port, open_browser=False)


def test_interactive_modify_puts_the_delta_on_the_submitted_modules(capsys):
    model = tiny_bert()
    built = {}
    worker = threading.Thread(target=lambda: built.setdefault("delta", LoraModel(model, interactive_modify=True)))
    worker.start()
    url = ""
    for _ in range(300):  # the URL is printed on stderr
        match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", capsys.readouterr().err)
        if match:
            url = match.group(0)
            break
        time.sleep(0.05)
    paths = ["encoder.layer.0.attention.self.key", "encoder.layer.1.attention.self.key"]
    assert call(url, "/submit", {"paths": paths})[0] == 200
    worker.join(30)
    assert sorted(built["delta"].layers) == paths


# ----------------------------------------------------------------------- hostile clients


def raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """(status, JSON answer) of one request with exactly `headers` (Host included only if given)."""
    parts = urlsplit(url)
    token = parse_qs(parts.query)["token"][0]
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest(method, f"{path}?token={token}", skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if method == "POST":
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body if method == "POST" else None)
        response = connection.getresponse()
        raw_body = response.read()
        return response.status, (json.loads(raw_body) if raw_body.startswith(b"{") else {"html": raw_body.decode()})
    finally:
        connection.close()


def cancel(selection: Selection) -> None:
    selection.call("/cancel", {})
    with pytest.raises(SelectionCancelled):
        selection.outcome()


def test_requests_for_another_host_name_are_misdirected():
    # a DNS-rebinding page reaches 127.0.0.1 under its own name, which the browser sends as Host
    selection = Selection(tiny_bert())
    port = urlsplit(selection.url).port
    for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"[::1]:{port}"):
        status, answer = raw(selection.url, "GET", "/tree", {"Host": host})
        assert status == 421, host
        assert f"127.0.0.1:{port}" in answer["error"]
    assert raw(selection.url, "GET", "/tree", {})[0] == 421  # no Host at all
    assert raw(selection.url, "GET", "/tree", {"Host": f"127.0.0.1:{port}"})[0] == 200
    assert raw(selection.url, "GET", "/tree", {"Host": f"LocalHost:{port}"})[0] == 200
    cancel(selection)


def test_posts_from_another_origin_are_forbidden():
    selection = Selection(tiny_bert())
    port = urlsplit(selection.url).port
    body = json.dumps({"paths": ["pooler.dense"]}).encode()
    own = {"Host": f"127.0.0.1:{port}"}
    for origin in ("http://evil.example", f"http://localhost:{port}", "null", f"https://127.0.0.1:{port}"):
        status, answer = raw(selection.url, "POST", "/submit", {**own, "Origin": origin}, body)
        assert status == 403, origin
        assert origin in answer["error"]
    assert raw(selection.url, "POST", "/compress", {**own, "Origin": f"http://127.0.0.1:{port}"}, body)[0] == 200
    assert raw(selection.url, "POST", "/compress", own, body)[0] == 200  # no Origin: not sent by a web page
    localhost = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert raw(selection.url, "POST", "/submit", localhost, body)[0] == 200
    assert selection.outcome() == ["pooler.dense"]


@pytest.mark.parametrize(
    "body, error",
    [
        (b"[" * 100_000, "nested more than 32 levels"),
        (b'{"paths": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32 levels"),
        (b'{"paths": [' + b"9" * 5000 + b"]}", "not valid JSON"),
    ],
    ids=["unclosed-100000", "closed-41", "5000-digit-number"],
)
def test_a_hostile_json_body_gets_a_bad_request_answer(body: bytes, error: str):
    selection = Selection(tiny_bert())
    status, answer = selection.call("/compress", body)
    assert status == 400
    assert error in answer["error"]
    assert selection.call("/compress", {"paths": ["pooler.dense"]})[0] == 200  # and the server still answers
    cancel(selection)


def test_paths_that_are_not_strings_get_a_bad_request_answer():
    selection = Selection(tiny_bert())
    status, answer = selection.call("/compress", {"paths": ["pooler.dense", {"a": 1}]})
    assert (status, answer["error"]) == (400, '"paths" must hold module paths as strings; got {"a": 1}.')
    cancel(selection)


def test_a_body_over_the_size_limit_is_refused_unread():
    selection = Selection(tiny_bert())
    parts = urlsplit(selection.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as client:
        client.sendall(
            f"POST /compress?{parts.query} HTTP/1.1\r\nHost: 127.0.0.1:{parts.port}\r\n"
            f"Content-Length: {selector_server.MAX_BODY + 1}\r\n\r\n".encode()
        )
        reply = client.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 413 ")
    cancel(selection)


def handler_threads() -> int:
    """Threads of the running servers' connections (socketserver names them after process_request_thread)."""
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def test_idle_connections_are_closed_after_the_timeout_and_free_their_threads(monkeypatch):
    monkeypatch.setattr(selector_server, "IDLE_TIMEOUT_S", 0.5)
    selection = Selection(tiny_bert())
    parts = urlsplit(selection.url)
    before = handler_threads()
    idle = [socket.create_connection((parts.hostname, parts.port), timeout=10) for _ in range(50)]
    try:
        idle[0].sendall(b"GET / HTTP/1.1\r\n")  # half a request, then silence
        assert selection.call("/tree")[0] == 200  # the server answers meanwhile
        for client in idle:
            assert client.recv(1) == b""  # closed by the server (else recv raises TimeoutError after 10 s)
    finally:
        for client in idle:
            client.close()
    deadline = time.monotonic() + 10
    while handler_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handler_threads() == before
    cancel(selection)


def test_a_burst_of_connections_waits_in_the_listen_queue():
    # not serving yet: every connection must wait in the kernel's accept queue, sized by the backlog
    server = selector_server._Server(("127.0.0.1", 0), selector_server._Session(nn.Linear(2, 2)))
    clients = []
    try:
        for _ in range(100):
            clients.append(socket.create_connection(server.server_address, timeout=5))
    finally:
        for client in clients:
            client.close()
        server.server_close()
    assert len(clients) == 100


# ----------------------------------------------------------------------- page in Chromium


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == []


def expand(page, *nodes: str) -> None:
    for node in nodes:
        page.locator(f'[data-node="{node}"] .twisty').click()


@needs_browser
def test_clicking_modules_and_a_group_returns_exact_patterns(page):
    model = tiny_bert()
    selection = Selection(model)
    page.goto(selection.url)
    expand(page, "encoder", "encoder.layer.0", "encoder.layer.0.attention", "encoder.layer.0.attention.self",
           "encoder.layer.0.output")
    page.locator('[data-node="encoder.layer.0.attention.self.query"] .unfold').click()
    page.locator('[data-path="encoder.layer.0.attention.self.query"] input').check()
    page.locator('[data-path="encoder.layer.1.attention.self.value"] input').check()
    page.locator('[data-node="encoder.layer.0.output.dense"] input').check()  # the group "dense" of both layers
    expected = [
        "encoder.layer.0.attention.self.query",
        r"[r]encoder\.layer\.[01]\.output\.dense",
        "encoder.layer.1.attention.self.value",
    ]
    expect(page.locator("#patterns li")).to_have_text(expected)
    page.locator("#submit").click()
    expect(page.locator(".done h2")).to_have_text("Submitted 4 modules")
    assert selection.outcome() == expected
    assert find_modules(model, expected) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.output.dense",
        "encoder.layer.1.attention.self.value",
        "encoder.layer.1.output.dense",
    ]


@needs_browser
def test_clicking_a_selected_line_again_unselects_it(page):
    selection = Selection(tiny_bert())
    page.goto(selection.url)
    expand(page, "pooler")
    box = page.locator('[data-node="pooler.dense"] input')
    box.check()
    expect(page.locator("#patterns li")).to_have_text(["pooler.dense"])
    box.uncheck()
    expect(page.locator("#patterns li")).to_have_count(0)
    expect(page.locator("#submit")).to_be_disabled()
    page.locator("#cancel").click()
    expect(page.locator(".done h2")).to_have_text("Selection cancelled")
    with pytest.raises(SelectionCancelled):
        selection.outcome()


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module('<img src=x onerror="pwned=1">', nn.Linear(2, 2))


@needs_browser
def test_module_names_are_shown_as_text_never_as_markup(page):
    selection = Selection(Hostile())
    page.goto(selection.url)
    name = '<img src=x onerror="pwned=1">'
    expect(page.locator("#tree .name")).to_have_text([name])
    assert page.locator("#tree img").count() == 0
    assert page.evaluate("window.pwned") is None
    page.locator("#tree input").check()
    page.locator("#submit").click()
    expect(page.locator(".done h2")).to_have_text("Submitted 1 module")
    assert selection.outcome() == [name]


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(1, 1) for _ in range(1000))


@needs_browser
def test_a_thousand_module_group_shows_one_line_and_unfolds_in_pages(page):
    selection = Selection(Wide())
    page.goto(selection.url)
    expect(page.locator("#tree .row")).to_have_count(1)
    page.locator('[data-node="blocks.0"] .unfold').click()
    expect(page.locator("#tree .member")).to_have_count(200)
    page.get_by_text("show 200 more of 800").click()
    expect(page.locator("#tree .member")).to_have_count(400)
    page.locator('[data-node="blocks.0"] input').first.check()
    expect(page.locator("#count")).to_have_text("1000 modules selected, 1 pattern")
    page.locator("#submit").click()
    expect(page.locator(".done h2")).to_have_text("Submitted 1000 modules")
    assert selection.outcome() == [r"[r]blocks\.(?:[0-9]|[1-9][0-9]|[1-9][0-9]{2})"]
