"""Crawler policy: what one image request may do, enforced inside img2dataset's fetch.

img2dataset stays the downloader (sharding, threads, writers, stats); `curation.i2d` replaces its
per-URL fetch (`img2dataset.downloader.download_image`) with `img2dataset_fetch` below, in every
worker process. One request:
- the URL must be http(s) with a host (`url_problem`), checked before anything is sent and again
  for every redirect target (a redirect to file://, ftp://, data: ... is refused);
- the host is resolved once and every address is checked: loopback, private, link-local, shared,
  reserved, multicast, unspecified and IPv4-mapped/6to4/Teredo forms of them are refused unless
  `download.allow_private_addresses` (or the address is in `download.allowed_networks`); the
  socket then connects to exactly the address that was checked, so a DNS answer that changes
  between check and connect (DNS rebinding) cannot redirect the request;
- one wall-clock deadline covers DNS, connect, redirects, headers and body: every socket read gets
  the time that is left, so a server sending 1 byte/s ends within the deadline (a socket timeout
  alone restarts on every byte);
- the body is read in chunks and counted against `max_bytes` (raw and, for gzip/deflate
  Content-Encoding, decoded: a compression bomb stops at max_bytes of output); a body shorter than
  its Content-Length is an error, bytes beyond it are never read; Content-Length values that
  disagree (repeated header lines or a comma list) or are not numbers are an error (RFC 9112 6.3).
Failures raise FetchError with a one-line reason that ends up in the manifest's `error` column.
Not handled: HTTP proxies (the environment's http_proxy is ignored), HTTP/2, cookies.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's
MAX_URL_CHARS = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 << 10


class FetchError(Exception):
    """A request that ended without an image; the message is the row's reason."""


@dataclass(frozen=True)
class Policy:
    """What one request may do (built from DownloadConfig; pickled to img2dataset's workers)."""

    timeout: float = 10.0  # seconds without any progress on a socket operation
    deadline: float = 30.0  # wall-clock seconds for the whole request, redirects included
    max_bytes: int = 64 << 20  # body bytes, raw and after Content-Encoding decoding
    max_redirects: int = 5
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()


def url_problem(url: str | None) -> str | None:
    """Why `url` may not be fetched at all (the row's invalid_input reason), or None."""
    if url is None or not str(url).strip():
        return "empty URL"
    url = str(url).strip()
    if len(url) > MAX_URL_CHARS:
        return f"URL longer than {MAX_URL_CHARS} characters"
    if _CONTROL.search(url):
        return f"URL contains control characters: {url[:80]!r}"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a non-numeric or out-of-range port
    except ValueError as e:
        return f"malformed URL ({e}): {url[:80]!r}"
    if parts.scheme.lower() not in ("http", "https"):
        what = f"scheme {parts.scheme.lower()!r}" if parts.scheme else "no scheme"
        return f"not an http(s) URL ({what}): {url[:80]!r}"
    if not parts.hostname:
        return f"URL has no host: {url[:80]!r}"
    if port == 0:
        return f"URL has port 0: {url[:80]!r}"
    return None


def address_problem(ip: str, policy: Policy) -> str | None:
    """What makes `ip` refused under `policy` ("a loopback address", ...), or None. Non-global addresses (RFC 1918,
    loopback, link-local incl. cloud metadata 169.254.169.254, 100.64/10, 0/8, fc00::/7, ...) are
    refused, also when hidden inside IPv4-mapped, 6to4 or Teredo IPv6 addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    inner = [addr]
    if addr.version == 6:
        inner += [a for a in (addr.ipv4_mapped, addr.sixtofour, addr.teredo and addr.teredo[1]) if a]
    for net in policy.allowed_networks:
        if any(a in ipaddress.ip_network(net, strict=False) for a in inner):
            return None
    if policy.allow_private:
        return None
    for a in inner:
        if a.is_loopback:
            kind = "loopback"
        elif a.is_link_local:
            kind = "link-local"
        elif a.is_multicast:
            kind = "multicast"
        elif a.is_unspecified:
            kind = "unspecified"
        elif not a.is_global or a.is_reserved:
            kind = "private or reserved"
        else:
            continue
        return f"a {kind} address"
    return None


# --- connections that connect only to checked addresses, with one deadline for everything ----

_dns_pool: ThreadPoolExecutor | None = None
_ssl_ctx: ssl.SSLContext | None = None
_init_lock = threading.Lock()  # img2dataset calls fetch from many threads


def _resolve(host: str, port: int, left: float) -> list[tuple]:
    """getaddrinfo bounded by the deadline (the system resolver has no timeout of its own)."""
    global _dns_pool
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except ValueError:
        pass
    with _init_lock:
        if _dns_pool is None:
            _dns_pool = ThreadPoolExecutor(32, thread_name_prefix="sigma-dns")
    fut = _dns_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return fut.result(timeout=max(left, 0.001))
    except FutureTimeout:
        raise FetchError(f"deadline exceeded while resolving {host}") from None
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve {host}: {e.strerror or e}") from None


class _Guard:
    """socket.create_connection replacement: resolve, check every address, connect to a checked one."""

    def __init__(self, policy: Policy, deadline: float):
        self.policy, self.deadline = policy, deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, address, timeout=None, source_address=None, **_):
        host, port = address
        infos = _resolve(host, port, self.left())
        if not infos:
            raise FetchError(f"cannot resolve {host}: no address")
        refused, last = [], None
        for family, stype, proto, _, sockaddr in infos:
            problem = address_problem(sockaddr[0], self.policy)
            if problem:
                refused.append(f"{sockaddr[0]}, {problem}" if sockaddr[0] != host else f"{host} is {problem}")
                continue
            if self.left() <= 0:
                break
            sock = socket.socket(family, stype, proto)
            try:
                sock.settimeout(min(self.policy.timeout, self.left()))
                sock.connect(sockaddr)  # the very address that was checked
                return sock
            except OSError as e:
                sock.close()
                last = e
        if refused and last is None:
            what = refused[0] if refused[0].startswith(host + " is ") else f"{host} resolves to {refused[0]}"
            raise FetchError(f"refused: {what} (set download.allow_private_addresses: true to allow)")
        if last is None:
            raise FetchError(f"deadline exceeded while connecting to {host}")
        if isinstance(last, TimeoutError):
            raise FetchError(f"timed out connecting to {host} (download.timeout {self.policy.timeout:g} s)")
        raise FetchError(f"connection failed: {last}")


class _DeadlineRaw(io.RawIOBase):
    """The response's byte source: every recv gets min(timeout, time left before the deadline)."""

    def __init__(self, sock: socket.socket, guard: _Guard):
        self.sock, self.guard = sock, guard
        self.io = sock.makefile("rb", buffering=0)  # holds a reference: the socket stays open while read

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.io.close()
        super().close()

    def readinto(self, b) -> int:
        left = self.guard.left()
        if left <= 0:
            raise FetchError(f"deadline exceeded: no complete response within {self.guard.policy.deadline:g} s "
                             "(download.deadline; slow or endless response)")
        self.sock.settimeout(min(self.guard.policy.timeout, left))
        try:
            return self.io.readinto(b)
        except TimeoutError:
            if self.guard.left() <= 0.01:
                raise FetchError(f"deadline exceeded: no complete response within {self.guard.policy.deadline:g} s "
                                 "(download.deadline; slow or endless response)") from None
            raise FetchError(f"read timed out: no data for {self.guard.policy.timeout:g} s (download.timeout)") from None


class _SockView:
    """What HTTPResponse needs of a socket: makefile, over the deadline reader."""

    def __init__(self, sock, guard):
        self.sock, self.guard = sock, guard

    def makefile(self, mode="rb"):
        return io.BufferedReader(_DeadlineRaw(self.sock, self.guard), _CHUNK)


def _response_class(guard: _Guard):
    class Response(http.client.HTTPResponse):
        def __init__(self, sock, *a, **kw):
            super().__init__(_SockView(sock, guard), *a, **kw)
    return Response


def _connection(scheme: str, host: str, port: int, guard: _Guard) -> http.client.HTTPConnection:
    global _ssl_ctx
    if scheme == "https":
        with _init_lock:
            if _ssl_ctx is None:
                _ssl_ctx = ssl.create_default_context()  # verifies certificates, like urllib's default
        conn = http.client.HTTPSConnection(host, port, timeout=guard.policy.timeout, context=_ssl_ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=guard.policy.timeout)
    conn._create_connection = guard  # noqa: SLF001 - http.client's documented hook for tests/mocks
    conn.response_class = _response_class(guard)
    return conn


def _target(parts) -> str:
    """Request target with non-ASCII and spaces percent-encoded (what browsers send)."""
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query else "")
    return quote(target, safe="/?&=%:;@+,$!*'()~[]-._")


# --- body decoding ------------------------------------------------------------------------------

class _Body:
    """Collects the body: counts raw bytes, decodes gzip/deflate with a bounded output size."""

    def __init__(self, encoding: str, max_bytes: int):
        enc = encoding.strip().lower()
        self.max, self.raw, self.out, self.enc = max_bytes, 0, [], enc
        self.size, self.head = 0, b""
        if enc in ("", "identity"):
            self.d = None
        elif enc in ("gzip", "x-gzip"):
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self.d = "deflate?"  # zlib-wrapped or raw: decided on the first bytes
        else:
            raise FetchError(f"unsupported Content-Encoding {encoding!r}")

    def feed(self, chunk: bytes) -> None:
        self.raw += len(chunk)
        if self.raw > self.max:
            raise FetchError(f"response too large: more than {self.max} bytes (download.max_bytes)")
        if self.d is None:
            self._add(chunk)
            return
        if isinstance(self.d, str):  # "deflate?": servers send zlib-wrapped or raw deflate
            self.head += chunk
            if len(self.head) < 2:
                return
            h = self.head
            zlib_header = h[0] & 0x0F == 8 and (h[0] << 8 | h[1]) % 31 == 0
            self.d, chunk = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS), h
        try:
            self._add(self.d.decompress(chunk, self.max - self.size + 1))  # never more than the budget + 1
        except zlib.error as e:
            raise FetchError(f"corrupt {self.enc} Content-Encoding: {e}") from None

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max:
            what = f" after {self.enc} decoding (compression bomb?)" if self.d is not None else ""
            raise FetchError(f"response too large: more than {self.max} bytes{what} (download.max_bytes)")
        self.out.append(data)

    def finish(self) -> bytes:
        if (isinstance(self.d, str) and self.head) or (self.d is not None and not isinstance(self.d, str)
                                                      and not self.d.eof):
            raise FetchError(f"truncated {self.enc} Content-Encoding stream")
        return b"".join(self.out)


# --- one request --------------------------------------------------------------------------------

def fetch(url: str, policy: Policy, user_agent: str = USER_AGENT, robots=None) -> bytes:
    """The image bytes at `url` (after redirects and Content-Encoding), or FetchError.

    `robots(headers) -> bool`: True refuses the response (X-Robots-Tag opt-out)."""
    problem = url_problem(url)
    if problem:
        raise FetchError(f"invalid URL: {problem}")
    guard = _Guard(policy, time.monotonic() + policy.deadline)
    url = url.strip()
    seen = {url}
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        conn = _connection(scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80), guard)
        try:
            try:
                conn.request("GET", _target(parts), headers={"User-Agent": user_agent, "Accept": "*/*",
                                                             "Connection": "close"})
                resp = conn.getresponse()
            except (http.client.HTTPException, OSError) as e:
                raise FetchError(f"connection failed: {type(e).__name__}: {e}"[:300]) from None
            if resp.status in _REDIRECTS:
                loc = resp.getheader("Location")
                if not loc:
                    raise FetchError(f"HTTP {resp.status} redirect without a Location header")
                nxt = urljoin(url, loc.strip())
                problem = url_problem(nxt)
                if problem:
                    raise FetchError(f"redirect refused: {problem}")
                if nxt in seen:
                    raise FetchError(f"redirect loop: {nxt[:100]}")
                seen.add(nxt)
                url = nxt
                continue
            if not 200 <= resp.status < 300:
                raise FetchError(f"HTTP Error {resp.status}: {resp.reason}")
            if robots is not None and robots(resp.headers):
                raise FetchError("Use of image disallowed by X-Robots-Tag directive")
            return _read_body(resp, policy)
        finally:
            conn.close()
    raise FetchError(f"too many redirects (more than {policy.max_redirects})")


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    """The body length the response announces, or None (chunked, or no Content-Length).

    RFC 9112 6.3: Content-Length values that differ, across header lines or in one comma list, or one
    that is not a decimal number, make the response invalid (http.client would trust the first line
    and read that many bytes: a response-splitting vector); identical repeats count as one value.
    Transfer-Encoding: chunked overrides Content-Length (http.client then ignores it too)."""
    if resp.chunked:
        return None
    lines = resp.msg.get_all("Content-Length") or []
    values = [v.strip() for line in lines for v in str(line).split(",")]
    if not values:
        return None
    bad = [v for v in values if not (v.isascii() and v.isdigit())]
    if bad:
        raise FetchError(f"invalid Content-Length {bad[0][:40]!r} (RFC 9112 6.3: not a decimal number)")
    if len({int(v) for v in values}) > 1:
        raise FetchError(f"conflicting Content-Length values {', '.join(values)[:80]} (RFC 9112 6.3: "
                         "an invalid response)")
    return int(values[0])


def _read_body(resp: http.client.HTTPResponse, policy: Policy) -> bytes:
    declared = _content_length(resp)
    if declared is not None and declared > policy.max_bytes:
        raise FetchError(f"response too large: Content-Length {declared} > {policy.max_bytes} (download.max_bytes)")
    body = _Body(resp.getheader("Content-Encoding") or "", policy.max_bytes)
    try:
        while chunk := resp.read1(_CHUNK):
            body.feed(chunk)
    except http.client.IncompleteRead as e:
        raise FetchError(f"incomplete body: connection closed after {body.raw + len(e.partial)} bytes") from None
    except (http.client.HTTPException, OSError) as e:
        raise FetchError(f"body read failed: {type(e).__name__}: {e}"[:300]) from None
    if declared is not None and body.raw < declared:
        raise FetchError(f"incomplete body: {body.raw} of the {declared} bytes announced by Content-Length")
    return body.finish()


def img2dataset_fetch(row, timeout, user_agent_token, disallowed_header_directives, *, policy: Policy):
    """Drop-in for img2dataset.downloader.download_image(row, timeout, ...) -> (key, BytesIO | None,
    error | None); `timeout` is already in `policy`."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    ua = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                       if user_agent_token else "")
    robots = (functools.partial(_robots, token=user_agent_token, directives=disallowed_header_directives,
                                check=is_disallowed) if disallowed_header_directives else None)
    try:
        return key, io.BytesIO(fetch(url, policy, ua, robots)), None
    except FetchError as e:
        return key, None, str(e)
    except Exception as e:  # noqa: BLE001 - a row's failure must never cost the shard
        return key, None, f"fetch failed: {type(e).__name__}: {e}"[:300]


def _robots(headers, token, directives, check) -> bool:
    return check(headers, token, directives)
