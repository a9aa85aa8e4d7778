"""POSTs live tube events (flat JSON objects) to an HTTP receiver without ever delaying the stream.

``stream.py --webhook URL`` hands each event to ``WebhookSender.send``, which only puts it on a bounded
queue; a daemon thread POSTs the queued events in order, one at a time, with a per-request timeout and
retries with exponential back-off on connection errors, timeouts and 5xx responses. A 4xx (or a redirect)
fails at once: repeating the same request cannot fix it. When the queue is full the event is dropped and
counted, so a slow or dead receiver costs the stream events, never time. Warnings are rate-limited (the
first problem, then at most one every ``WARN_EVERY_SEC``) and carry no traceback; ``summary()`` gives the
totals.
"""
from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from runtime import UsageError, one_line

log = logging.getLogger("star.webhook")

WARN_EVERY_SEC = 10.0
# What one POST may raise: HTTPError (a URLError) for a non-2xx status, URLError for refused connections,
# DNS and TLS errors, OSError / TimeoutError for socket errors and timeouts, HTTPException for a broken reply.
POST_ERRORS = (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError)


def check_url(url: str) -> str:
    """``url`` unchanged when it is an http:// or https:// URL with a host; else a one-line UsageError."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric or out-of-range port
    except ValueError as err:
        raise UsageError(f"--webhook {url!r}: not a valid URL ({one_line(err)})") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--webhook {url!r}: needs an http:// or https:// URL")
    if not parts.hostname:
        raise UsageError(f"--webhook {url!r}: the URL names no host")
    return url


def _plain(value: object) -> object:
    """JSON fallback: numpy scalars as numbers (``.item()``), anything else as its text."""
    return value.item() if hasattr(value, "item") else str(value)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns a 3xx into an HTTPError: urllib would re-send a redirected POST as a GET, losing the event."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


class WebhookSender:
    """Delivers events to ``url`` from its own daemon thread; ``send`` never blocks.

    Counters: ``sent`` (accepted by ``send``), ``delivered`` (2xx), ``failed`` (4xx / 3xx, or still failing
    after ``retries`` retries), ``dropped`` (queue full, or sent after close), ``undelivered`` (still queued
    or in flight when ``close`` gave up). After ``close``: sent = delivered + failed + undelivered.
    """

    def __init__(self, url: str, queue_size: int = 1000, timeout_sec: float = 2.0, retries: int = 3,
                 backoff_sec: float = 0.5) -> None:
        self.url = check_url(url)
        parts = urllib.parse.urlsplit(url)
        self.name = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # no path: it often holds a secret
        self.timeout_sec, self.retries, self.backoff_sec = timeout_sec, max(0, retries), backoff_sec
        self.sent = self.delivered = self.failed = self.dropped = self.undelivered = 0
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._lock = threading.Lock()      # counters and the closed / abandoned flags; never held during I/O
        self._closing = threading.Event()  # set by close, after _deadline
        self._deadline: float | None = None
        self._closed = self._abandoned = False
        self._last_warn: float | None = None
        self._unwarned = 0
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> bool:
        """Queues ``event`` for delivery; False (and counted as dropped) when the queue is full or closed."""
        body = json.dumps(event, ensure_ascii=False, default=_plain).encode("utf-8")
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(body)
                    self.sent += 1
                    return True
                except queue.Full:
                    pass
            self.dropped += 1
        self._warn("queue full" if not self._closed else "sender closed")
        return False

    def close(self, wait_sec: float = 5.0) -> None:
        """Stops accepting events, delivers what it can within ``wait_sec``, then counts the rest undelivered."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._deadline = time.monotonic() + max(0.0, wait_sec)
        self._closing.set()
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        with self._lock:  # a worker still in a request is abandoned: it counts nothing more
            self._abandoned = True
            self.undelivered = self.sent - self.delivered - self.failed

    def summary(self) -> str:
        """One line of totals, for the log at the stream's end."""
        return (f"webhook {self.name}: {self.delivered} delivered, {self.failed} failed, "
                f"{self.dropped} dropped, {self.undelivered} undelivered")

    def _run(self) -> None:
        """Worker: POSTs queued events in order until close's queue is empty or its deadline passes."""
        while self._deadline is None or time.monotonic() < self._deadline:
            try:
                body = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            outcome = self._deliver(body)
            with self._lock:
                if self._abandoned:
                    return
                if outcome == "delivered":
                    self.delivered += 1
                elif outcome is not None:
                    self.failed += 1
            if outcome not in (None, "delivered"):
                self._warn(outcome)

    def _deliver(self, body: bytes) -> str | None:
        """``"delivered"``, the reason it failed, or None when close's deadline stopped the attempts."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            timeout = self.timeout_sec
            if self._deadline is not None:
                timeout = min(timeout, self._deadline - time.monotonic())
                if timeout <= 0:
                    return None
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    response.read()
                return "delivered"
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}"
                err.close()
                if err.code < 500:
                    return reason
            except POST_ERRORS as err:
                reason = one_line(getattr(err, "reason", None) or err) or type(err).__name__
            if attempt < self.retries and not self._pause(self.backoff_sec * 2 ** attempt):
                return None
        return reason

    def _pause(self, delay: float) -> bool:
        """Sleeps one back-off; False, at once, when it would end after close's deadline."""
        end = time.monotonic() + delay
        if self._deadline is None and not self._closing.wait(delay):
            return True
        if end > self._deadline:
            return False
        time.sleep(max(0.0, end - time.monotonic()))
        return True

    def _warn(self, reason: str) -> None:
        """Logs the first problem, then at most one warning every WARN_EVERY_SEC with the count since."""
        now = time.monotonic()
        with self._lock:
            self._unwarned += 1
            if self._last_warn is not None and now - self._last_warn < WARN_EVERY_SEC:
                return
            count, self._unwarned, self._last_warn = self._unwarned, 0, now
        log.warning("webhook %s: %d event(s) not delivered (%s)", self.name, count, reason)
