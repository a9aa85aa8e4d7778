"""webhook.py against real HTTP receivers on 127.0.0.1: healthy, slow, refusing, dying, 5xx and 4xx ones."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import webhook
from runtime import UsageError


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out leaves a broken pipe behind; not the test's business


class Receiver:
    """An HTTP receiver in a thread. ``statuses`` gives the reply to the n-th POST (then 200); while
    ``gate`` is clear every request waits on it, which makes a slow receiver."""

    def __init__(self, statuses: tuple = (), slow: bool = False) -> None:
        self.statuses, self.requests, self.accepted = list(statuses), [], []
        self.gate = threading.Event()
        if not slow:
            self.gate.set()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner.lock:
                    n = len(owner.requests)
                    owner.requests.append((self.path, self.headers["Content-Type"], body))
                owner.gate.wait(10)
                status = owner.statuses[n] if n < len(owner.statuses) else 200
                if status < 300:
                    with owner.lock:
                        owner.accepted.append(json.loads(body.decode("utf-8")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receivers():
    started = []

    def make(**kwargs) -> Receiver:
        started.append(Receiver(**kwargs))
        return started[-1]
    yield make
    for receiver in started:
        receiver.stop()


def wait_for(condition, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def events(n: int, first: int = 0) -> list[dict]:
    return [{"event": "start" if i % 2 == 0 else "end", "tube_id": i, "pred_class": "hand shake ✋",
             "score": 0.5 + i / 1000, "action_end_sec": None, "wall_time": "2024-01-01T00:00:00Z"}
            for i in range(first, first + n)]


def quick_send(sender: webhook.WebhookSender, event: dict) -> bool:
    """``sender.send(event)``, asserted to return within 50 ms; it runs in a thread so that a send that
    blocks fails the test instead of hanging it."""
    result = []

    def timed() -> None:
        start = time.monotonic()
        result.append(sender.send(event))
        result.append(time.monotonic() - start)
    thread = threading.Thread(target=timed, daemon=True)
    thread.start()
    thread.join(2.0)
    assert result, "send() blocked"
    assert result[1] < 0.05
    return result[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthy_receiver_gets_every_event_in_order(receivers):
    receiver = receivers()
    sender = webhook.WebhookSender(receiver.url)
    sent = events(40)
    assert all(sender.send(e) for e in sent)
    sender.close(wait_sec=10)
    assert receiver.accepted == sent
    assert [r[0] for r in receiver.requests] == ["/hook"] * 40
    assert {r[1] for r in receiver.requests} == {"application/json"}
    assert receiver.requests[0][2] == json.dumps(sent[0], ensure_ascii=False).encode("utf-8")
    assert (sender.sent, sender.delivered, sender.failed, sender.dropped, sender.undelivered) == (40, 40, 0, 0, 0)
    assert sender.summary() == f"webhook {receiver.url[:-5]}: 40 delivered, 0 failed, 0 dropped, 0 undelivered"
    sender.close()  # idempotent
    assert sender.send(sent[0]) is False and sender.dropped == 1 and sender.delivered == 40


def test_slow_receiver_never_delays_send_and_close_keeps_its_bound(receivers):
    receiver = receivers(slow=True)
    sender = webhook.WebhookSender(receiver.url, timeout_sec=1.5, retries=1, backoff_sec=0.05)
    for e in events(5):
        assert quick_send(sender, e)
    assert wait_for(lambda: receiver.requests)  # the worker is stuck in its first request
    start = time.monotonic()
    sender.close(wait_sec=0.5)  # shorter than one request's timeout: close may not wait for it
    assert time.monotonic() - start < 1.3
    assert sender.delivered == 0 and sender.failed + sender.undelivered == 5 and sender.undelivered >= 1
    sender._thread.join(2)
    assert not sender._thread.is_alive()


def test_refusing_receiver_counts_failures_and_rate_limits_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="star.webhook")
    sender = webhook.WebhookSender(f"http://127.0.0.1:{free_port()}/x", retries=2, backoff_sec=0.01)
    for e in events(20):
        assert sender.send(e)
    sender.close(wait_sec=10)
    assert (sender.delivered, sender.failed, sender.undelivered) == (0, 20, 0)
    warnings = [r for r in caplog.records if r.name == "star.webhook"]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert "not delivered" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()


def test_receiver_dying_mid_stream(receivers):
    receiver = receivers()
    sender = webhook.WebhookSender(receiver.url, retries=1, backoff_sec=0.01)
    first, later = events(3), events(4, first=3)
    for e in first:
        sender.send(e)
    assert wait_for(lambda: sender.delivered == 3)
    receiver.stop()
    for e in later:
        assert sender.send(e)
    sender.close(wait_sec=10)
    assert receiver.accepted == first
    assert sender.delivered == 3 and sender.failed + sender.undelivered == 4


def test_5xx_is_retried_until_delivered(receivers):
    receiver = receivers(statuses=(500, 503))
    sender = webhook.WebhookSender(receiver.url, retries=3, backoff_sec=0.01)
    sender.send(events(1)[0])
    sender.close(wait_sec=10)
    assert len(receiver.requests) == 3 and receiver.accepted == events(1)
    assert (sender.delivered, sender.failed) == (1, 0)


def test_4xx_is_not_retried(receivers):
    receiver = receivers(statuses=(400, 400, 400))
    sender = webhook.WebhookSender(receiver.url, retries=3, backoff_sec=0.01)
    sender.send(events(1)[0])
    sender.close(wait_sec=10)
    assert len(receiver.requests) == 1 and receiver.accepted == []
    assert (sender.delivered, sender.failed) == (0, 1)


def test_full_queue_drops_and_counts(receivers):
    receiver = receivers(slow=True)
    sender = webhook.WebhookSender(receiver.url, queue_size=2, timeout_sec=5)
    batch = events(5)
    assert sender.send(batch[0])
    assert wait_for(lambda: receiver.requests)  # the first event is in flight, the queue is empty
    assert [quick_send(sender, e) for e in batch[1:]] == [True, True, False, False]
    assert sender.dropped == 2
    receiver.gate.set()
    sender.close(wait_sec=10)
    assert receiver.accepted == batch[:3]
    assert (sender.sent, sender.delivered, sender.dropped, sender.undelivered) == (3, 3, 2, 0)


@pytest.mark.parametrize("url", ["ftp://x", "http://", "notaurl", "http://host:99999/"])
def test_check_url_rejects(url):
    with pytest.raises(UsageError) as info:
        webhook.check_url(url)
    message = str(info.value)
    assert message.startswith("--webhook") and "\n" not in message


def test_check_url_accepts_http_and_https():
    for url in ("http://127.0.0.1:8080/hook", "https://example.com/a?b=c"):
        assert webhook.check_url(url) == url
