"""Test helpers for live servers, shared by tests/service and tests/index_builder (importable as ``live_server``:
pytest puts this folder on ``sys.path`` for its conftest.py).

``LiveServer`` is a real uvicorn server in a thread on a loopback socket, with the options of
``python -m service``; ``ClientThreads`` are client threads looping until their context ends; ``poll`` and
``wait_ready`` wait for a condition; ``metric`` reads one sample of a ``/metrics`` text.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from service.__main__ import server_options


class LiveServer:
    """A uvicorn server in a thread, on a loopback socket bound before it starts (no port race)."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        options = {**server_options(app.state.settings), "log_level": "warning"}  # the options of `python -m service`
        config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=5, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def raw(self, request: bytes, *, until: bytes | None = None, timeout: float = 10) -> bytes:
        """Sends ``request`` as it is over a new socket (for what httpx will not send) and returns what comes
        back until the server closes the connection, or until ``until`` has arrived."""
        received = b""
        with socket.create_connection(self.address, timeout=timeout) as sock:
            sock.sendall(request)
            while (until is None or until not in received) and (chunk := sock.recv(65536)):
                received += chunk
        return received

    def wait_ready(self, timeout: float = 60) -> dict:
        return wait_ready(self.url, timeout)


def wait_ready(url: str, timeout: float = 60) -> dict:
    """Poll ``/readyz`` until it says ready; returns its body."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            last = r.text
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s: {last}")


def poll(fn, timeout: float = 60, interval: float = 0.1):
    """Call ``fn`` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except httpx.TransportError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s (last: {last!r})")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (exactly those labels, in any order) in the Prometheus exposition
    ``text``, or None when there is none. Parsing checks the text's syntax too."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


class ClientThreads:
    """``clients`` threads, each running ``self._run(n)`` until ``self.stop`` is set when the context ends; they
    are then joined (at most ``join_timeout`` seconds each). Subclasses record what they see."""

    join_timeout = 60.0

    def __init__(self, clients: int) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def _run(self, n: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_timeout)


def publish_while_searching(live: LiveServer, versions: list[str], publish, timeout: float = 30) -> None:
    """``publish()`` a new index version while clients search ``live`` (appending each answer's index version
    to ``versions``); return once the server serves another version and six more answers have come back."""
    first = live.wait_ready()["index_version"]
    publish()
    deadline = time.monotonic() + timeout
    while live.wait_ready()["index_version"] == first:
        assert time.monotonic() < deadline, "the new version was not picked up"
        time.sleep(0.05)
    seen_new = len(versions)
    while len(versions) < seen_new + 6 and time.monotonic() < deadline:  # keep querying the new one
        time.sleep(0.05)
