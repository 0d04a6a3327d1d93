"""The selector's one-line opt-in to the original OpenDelta's binding (every interface, for a model
on a remote machine): OPENDELTA_SELECTOR_HOST=0.0.0.0. The token stays required."""

import http.client
import socket
import threading
from urllib.parse import urlsplit

from compat_models import bert

from opendelta.interactive import select_modules


def request(port: int, method: str, path: str, host: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, body=b"{}" if method == "POST" else None,
                       headers={"Host": host, "Content-Type": "application/json"})
    status = connection.getresponse().status
    connection.close()
    return status


def test_opendelta_selector_host_listens_on_every_interface_with_the_token(monkeypatch, capsys):
    monkeypatch.setenv("OPENDELTA_SELECTOR_HOST", "0.0.0.0")
    ready, seen, outcome = threading.Event(), [], []

    def run() -> None:
        try:
            select_modules(bert(), open_browser=False, timeout=60, on_ready=lambda url: (seen.append(url), ready.set()))
        except Exception as exc:  # the page's Cancel ends the call
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert ready.wait(60)
    url = urlsplit(seen[0])
    assert url.hostname == socket.gethostname()
    token = url.query
    remote_name = f"gpu-box.example:{url.port}"  # the name a browser on another machine sends
    assert request(url.port, "GET", "/tree", remote_name) == 403  # no token
    assert request(url.port, "GET", f"/tree?{token}", remote_name) == 200
    assert request(url.port, "POST", f"/cancel?{token}", remote_name) == 200
    worker.join(60)
    assert type(outcome[0]).__name__ == "SelectionCancelled"
    assert "listens on 0.0.0.0" in capsys.readouterr().err
