"""A hostile web server on 127.0.0.1 for the crawler tests, and the image formats people meet.

Each route is a Case: what the server does and the manifest status + reason the row must end
with. The server records every path it was asked for, so a test can prove that a refused URL
never reached it.
"""
from __future__ import annotations

import gzip
import io
import socket
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from curation import demo_data as dd


@dataclass
class Case:
    name: str
    expect: str  # final manifest status (after download + score)
    reason: str | None = None  # a substring of the row's `error` (None: no error expected)
    url: str | None = None  # the URL in the list (default: the server's /<name>)
    handler: object = None  # fn(request_handler) -> None, serving this route


def _send(h, body: bytes, ctype: str = "image/jpeg", status: int = 200, headers: dict | None = None,
          length: int | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def _redirect(location: str, status: int = 302):
    def serve(h):
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return serve


def _slow_body(body: bytes):
    """Slow-loris: headers at once, then one byte per second (a socket timeout never fires)."""
    def serve(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for b in body:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(1.0)
    return serve


def _slow_headers(h):
    for b in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" * 1000:
        h.wfile.write(bytes([b]))
        h.wfile.flush()
        time.sleep(1.0)


def _endless(chunked: bool):
    def serve(h):
        h.protocol_version = "HTTP/1.1"
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        block = b"\xff\xd8\xff" + b"\x00" * (64 << 10)
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
    return serve


def _lying_length(body: bytes, length: int):
    def serve(h):
        _send(h, body, length=length)
        h.close_connection = True
    return serve


def _two_lengths(body: bytes, first: int, second: int):
    """Two Content-Length lines that disagree (RFC 9112 6.3: an invalid response)."""
    def serve(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(first))
        h.send_header("Content-Length", str(second))
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True
    return serve


def _encoded(body: bytes, encoding: str, ctype: str = "image/jpeg"):
    data = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    return lambda h: _send(h, data, ctype, headers={"Content-Encoding": encoding})


def _plain(body: bytes, ctype: str = "image/jpeg"):
    return lambda h: _send(h, body, ctype)


def formats() -> dict[str, bytes]:
    """Real-world formats made with Pillow (WebP, AVIF, animated GIF) and byte-exact HEIC / SVG."""
    img = dd.synthetic("green", "white", "circle", (96, 80), 7)
    out = {}
    for name, fmt, kw in (("webp", "WEBP", {"quality": 80}), ("avif", "AVIF", {"quality": 60})):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        out[name] = b.getvalue()
    frames = [dd.synthetic(c, "black", "square", (64, 64), i).convert("P") for i, c in enumerate(("red", "blue", "yellow"))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["gif"] = b.getvalue()
    # The first bytes of an iPhone photo: an ISO-BMFF 'ftyp' box with the HEIC brand, then 'meta'.
    out["heic"] = (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x01\x00meta" + b"\x00" * 240)
    out["svg"] = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" '
                  b'height="64"><circle cx="32" cy="32" r="20" fill="red"/></svg>\n')
    return out


def giant_header_jpeg() -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) is patched to claim 60000x2900: under 1 KB (issue 22.6)."""
    data = bytearray(dd._jpeg(dd.synthetic("red", "blue", "circle", (16, 16), 5)))
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = (2900).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


def cases(canary_url: str, side_url: str) -> list[Case]:
    """Every hostile behaviour; `side_url` is an image on a second loopback address (127.0.0.2)
    that the policy must refuse, `canary_url` a file:// URL outside the output folder."""
    jpg = dd._jpeg(dd.synthetic("red", "blue", "circle", (120, 100), 3))
    png = dd._png(dd.synthetic("blue", "white", "square", (100, 120), 4))
    f = formats()
    bomb = gzip.compress(b"\x00" * (24 << 20), 9)  # 24 MiB of zeros in ~24 KB: over max_bytes decoded
    return [
        Case("plain.jpg", "ok", handler=_plain(jpg)),
        Case("slow_body.jpg", "failed_download", "deadline exceeded", handler=_slow_body(jpg)),
        Case("slow_headers.jpg", "failed_download", "deadline exceeded", handler=_slow_headers),
        Case("endless.jpg", "failed_download", "response too large", handler=_endless(False)),
        Case("endless_chunked.jpg", "failed_download", "response too large", handler=_endless(True)),
        Case("huge_length.jpg", "failed_download", "Content-Length", handler=_lying_length(jpg, 10 << 30)),
        Case("short_body.jpg", "failed_download", "incomplete body", handler=_lying_length(jpg, len(jpg) + 5000)),
        Case("two_lengths.jpg", "failed_download", "conflicting Content-Length",
             handler=_two_lengths(jpg, len(jpg) // 2, len(jpg))),
        Case("long_body.jpg", "failed_decode", "truncated", handler=_lying_length(jpg, len(jpg) // 2)),
        Case("gzip_bomb.jpg", "failed_download", "compression bomb", handler=lambda h: _send(
            h, bomb, headers={"Content-Encoding": "gzip"})),
        Case("gzip.jpg", "ok", handler=_encoded(jpg, "gzip")),
        Case("deflate.png", "ok", handler=_encoded(png, "deflate", "image/png")),
        Case("brotli.jpg", "failed_download", "unsupported Content-Encoding", handler=lambda h: _send(
            h, jpg, headers={"Content-Encoding": "br"})),
        Case("jpeg_as_html.jpg", "ok", handler=_plain(jpg, "text/html")),
        Case("png_as_octets.png", "ok", handler=_plain(png, "application/octet-stream")),
        Case("giant_header.jpg", "failed_decode", "data ends early", handler=_plain(giant_header_jpeg())),
        Case("html_as_jpeg.jpg", "failed_decode", "HTML", handler=_plain(b"<html><body>login</body></html>")),
        Case("image.webp", "ok", handler=_plain(f["webp"], "image/webp")),
        Case("image.avif", "ok", handler=_plain(f["avif"], "image/avif")),
        Case("animated.gif", "ok", handler=_plain(f["gif"], "image/gif")),
        Case("photo.heic", "failed_decode", "HEIC", handler=_plain(f["heic"], "image/heic")),
        Case("drawing.svg", "failed_decode", "SVG", handler=_plain(f["svg"], "image/svg+xml")),
        Case("redirect_ok.jpg", "ok", handler=_redirect("/redirect_ok2.jpg")),
        Case("redirect_ok2.jpg", "ok", handler=_plain(jpg)),
        Case("redirect_loop.jpg", "failed_download", "redirect loop", handler=_redirect("/redirect_loop.jpg")),
        Case("redirect_chain.jpg", "failed_download", "too many redirects", handler=lambda h: _redirect(
            f"/redirect_chain.jpg?n={int(h.path.rpartition('=')[2]) + 1 if '=' in h.path else 1}")(h)),
        Case("to_file.jpg", "failed_download", "redirect refused", handler=_redirect(canary_url)),
        Case("to_ftp.jpg", "failed_download", "redirect refused", handler=_redirect("ftp://127.0.0.1/x.jpg")),
        Case("to_data.jpg", "failed_download", "redirect refused", handler=_redirect("data:image/gif;base64,R0lGODlhAQABAAAAACw=")),
        Case("to_loopback.jpg", "failed_download", "127.0.0.2 is a loopback address", handler=_redirect(side_url)),
        Case("to_metadata.jpg", "failed_download", "169.254.169.254 is a link-local address",
             handler=_redirect("http://169.254.169.254/latest/meta-data/")),
        Case("to_private.jpg", "failed_download", "10.1.2.3 is a private", handler=_redirect("http://10.1.2.3/x.jpg")),
        Case("to_mapped.jpg", "failed_download", "::ffff:127.0.0.2 is a", handler=_redirect(
            side_url.replace("127.0.0.2", "[::ffff:127.0.0.2]"))),
        Case("direct_loopback", "failed_download", "127.0.0.2 is a loopback address", url=side_url),
        Case("file_canary", "invalid_input", "not an http(s) URL", url=canary_url),
        Case("file_upper", "invalid_input", "not an http(s) URL", url=canary_url.replace("file://", "FILE://")),
        Case("data_url", "invalid_input", "not an http(s) URL", url="data:image/gif;base64,R0lGODlhAQABAAAAACw="),
        Case("ftp_url", "invalid_input", "not an http(s) URL", url="ftp://127.0.0.1/x.jpg"),
        Case("no_host", "invalid_input", "no host", url="http:///x.jpg"),
        Case("control_chars", "invalid_input", "control characters", url="http://127.0.0.1/a\x00b.jpg"),
    ]


class HostileServer(dd.LocalServer):
    """Serves `cases` on host:<free port> from daemon threads; records the paths requested."""

    def __init__(self, routes: dict, host: str = "127.0.0.1"):
        self.requested: list[str] = []
        requested = self.requested

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                requested.append(self.path)
                serve = routes.get(self.path.lstrip("/").split("?")[0])
                try:
                    serve(self) if serve else self.send_error(404)
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    pass

            def log_message(self, *args):
                pass

        super().__init__(Handler, host)
