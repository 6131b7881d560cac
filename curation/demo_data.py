"""The built-in sample: real photos shipped inside scikit-image / scikit-learn, generated images
whose captions describe them, and every kind of bad input, served from a local HTTP server.

Used by `make demo` and by the tests (the same server answers 404s, refused connections,
timeouts, HTML-as-image, ...), so the demo exercises exactly what the tests check.
"""
from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "stripes")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "immunohistochemistry", "hubble_deep_field")


@dataclass
class Item:
    name: str
    body: bytes
    caption: str | None
    content_type: str = "image/jpeg"
    status: int = 200
    delay: float = 0.0
    expect: str = "ok"  # the manifest status the tests expect for this row
    near_dup_of: str | None = None  # a planted near duplicate: the item it copies (dedup must pair them)


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=92, **kw)
    return b.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def synthetic(colour: str, bg: str, shape: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A `shape` of `colour` on `bg`, lightly textured so near-dedup does not merge all of them."""
    w, h = size
    rng = np.random.default_rng(seed)
    arr = np.empty((h, w, 3), np.float32)
    arr[:] = COLOURS[bg]
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "circle":
        m = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) * 0.35) ** 2
    elif shape == "square":
        m = (abs(xx - w / 2) < min(w, h) * 0.3) & (abs(yy - h / 2) < min(w, h) * 0.3)
    else:
        m = (xx // max(8, w // 10)) % 2 == 0
    arr[m] = COLOURS[colour]
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def photos() -> list[tuple[str, Image.Image]]:
    """Real photographs that ship inside scikit-image and scikit-learn (no download)."""
    out = []
    import skimage.data as skd

    for name in PHOTOS:
        try:
            arr = getattr(skd, name)()
        except Exception:  # some data sets need a download; skip them offline
            continue
        out.append((name, Image.fromarray(arr if arr.dtype == np.uint8 else (arr * 255).astype(np.uint8))))
    try:
        from sklearn.datasets import load_sample_images

        ds = load_sample_images()
        for fname, arr in zip(ds.filenames, ds.images):
            out.append((Path(fname).stem, Image.fromarray(arr)))
    except Exception:
        pass
    return out


def bad_items() -> list[Item]:
    """One item per kind of bad input, each with the manifest status it must end with."""
    good = synthetic("red", "blue", "circle", (320, 320), 1)
    jpg = _jpeg(good)
    cmyk = _jpeg(synthetic("green", "white", "square", (300, 280), 2).convert("CMYK"))
    arr16 = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    png16 = _png(Image.fromarray(arr16))  # uint16 array -> mode I;16
    pal = synthetic("yellow", "black", "circle", (300, 300), 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_png = _png(pal, transparency=0)
    rotated = synthetic("orange", "white", "stripes", (300, 400), 4)  # stored 300 wide x 400 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display -> 400 wide x 300 high
    bomb = _png(Image.new("1", (13500, 13500)))  # 182M pixels > Pillow's 179M limit; tiny file
    return [
        Item("html.jpg", b"<!DOCTYPE html><html><body>Not found</body></html>", "an html page", "text/html", expect="failed_decode"),
        Item("empty.jpg", b"", "zero bytes", expect="failed_decode"),
        Item("truncated.jpg", jpg[: len(jpg) // 2], "a truncated jpeg", expect="failed_decode"),
        Item("bomb.png", bomb, "a decompression bomb", "image/png", expect="failed_decode"),
        Item("tiny1x1.png", _png(Image.new("RGB", (1, 1), (9, 9, 9))), "one pixel", "image/png"),
        Item("banner.jpg", _jpeg(synthetic("purple", "white", "stripes", (2000, 200), 5)), "a very wide purple banner"),
        Item("cmyk.jpg", cmyk, "a green square in cmyk"),
        Item("gray16.png", png16, "a 16-bit gradient", "image/png"),
        Item("palette.png", pal_png, "a palette png with transparency", "image/png"),
        Item("exif_rotated.jpg", _jpeg(rotated, exif=exif.tobytes()), "an exif rotated orange stripes image"),
        Item("missing.jpg", b"gone", "a dead link", status=404, expect="failed_download"),
        Item("slow.jpg", jpg, "a server that never answers in time", delay=30.0, expect="failed_download"),
    ]


# What bad_items() already shows (colour pairs; shape on background): the generated sample
# avoids both, so that distinct rows look distinct.
RESERVED_PAIRS = [{"red", "blue"}, {"green", "white"}, {"yellow", "black"}, {"orange", "white"}, {"purple", "white"}]
RESERVED_BACKGROUNDS = {("circle", "black"), ("square", "white"), ("stripes", "white")}


def _synthetic_specs(n: int, rng) -> list[tuple[str, str, str]]:
    """(colour, background, shape) for n generated images: every item has its own pair of
    colours and no two share a shape on the same background (a small seeded search; with 7 free
    backgrounds per shape that holds for up to 21 items, later ones repeat the first)."""
    names = list(COLOURS)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if {a, b} not in RESERVED_PAIRS]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    pairs = [p if rng.random() < 0.5 else p[::-1] for p in pairs]  # preferred (colour, background)
    k = min(n, len(COLOURS) * len(SHAPES) - len(RESERVED_BACKGROUNDS))

    def search(i, free, used):
        if i == k:
            return []
        shape = SHAPES[i % len(SHAPES)]
        for j, p in enumerate(free):
            for c, bg in (p, p[::-1]):
                if (shape, bg) not in used:
                    rest = search(i + 1, free[:j] + free[j + 1:], used | {(shape, bg)})
                    if rest is not None:
                        return [(c, bg, shape)] + rest
        return None

    specs = search(0, pairs, frozenset(RESERVED_BACKGROUNDS))
    return [specs[i % k] for i in range(n)]


def planted_near_duplicates(items: list[Item]) -> list[Item]:
    """Copies a person would call duplicates: smaller, re-encoded, slightly cropped or edited;
    each smaller than its original (a size-first rank keeps the original) and still at least
    256 px on its short side (the demo's select.min_side), so dedup, not size, must drop it."""
    from PIL import ImageEnhance

    def img(name):
        it = next((x for x in items if x.name == name), None)
        return None if it is None else Image.open(io.BytesIO(it.body)).convert("RGB")

    out = []
    if (a := img("photo_coffee.jpg")) is not None:  # 3/4 size, quality 70
        out.append(Item("photo_coffee_small.jpg", _jpeg_q(a.resize((a.width * 3 // 4, a.height * 3 // 4), Image.BILINEAR), 70),
                        "a photo: coffee, small copy", near_dup_of="photo_coffee.jpg"))
    if (a := img("photo_chelsea.jpg")) is not None:  # 5 % off the left and the top
        w, h = a.size
        out.append(Item("photo_chelsea_crop.jpg", _jpeg_q(a.crop((w // 20, h // 20, w, h)), 85),
                        "a photo: chelsea, cropped", near_dup_of="photo_chelsea.jpg"))
    if (a := img("photo_astronaut.jpg")) is not None:  # brighter, more contrast, 90 %
        e = ImageEnhance.Contrast(ImageEnhance.Brightness(a).enhance(1.05)).enhance(1.05)
        out.append(Item("photo_astronaut_edit.jpg", _jpeg_q(e.resize((a.width * 9 // 10, a.height * 9 // 10)), 80),
                        "a photo: astronaut, edited", near_dup_of="photo_astronaut.jpg"))
    if (a := img("gen_001.jpg")) is not None:  # a generated image at 85 % size
        out.append(Item("gen_001_small.jpg", _jpeg_q(a.resize((a.width * 17 // 20, a.height * 17 // 20)), 75),
                        "a smaller copy", near_dup_of="gen_001.jpg"))
    return out


def _jpeg_q(img: Image.Image, quality: int) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality)
    return b.getvalue()


def demo_items(n_synthetic: int = 21, seed: int = 0, near_duplicates: bool = True) -> list[Item]:
    """Photos, n_synthetic generated images (pairwise distinct), then the planted near
    duplicates (Item.near_dup_of names the original)."""
    rng = np.random.default_rng(seed)
    items = []
    for name, img in photos():
        items.append(Item(f"photo_{name}.jpg", _jpeg(img), f"a photo: {name.replace('_', ' ')}"))
    aspects = [(320, 320), (448, 320), (320, 448), (512, 288), (288, 512), (384, 384)]
    for i, (c, b, shape) in enumerate(_synthetic_specs(n_synthetic, rng)):
        size = aspects[i % len(aspects)]
        cap = f"a {c} {shape} on a {b} background" if shape != "stripes" else f"{c} and {b} stripes"
        if i % 8 == 7:
            cap = ["", f"IMG_{1000 + i}.JPG", f"https://example.com/img/{i}.jpg"][i % 3]  # junk alt text
        items.append(Item(f"gen_{i:03d}.jpg", _jpeg(synthetic(c, b, shape, size, 100 + i)), cap))
    return items + (planted_near_duplicates(items) if near_duplicates else [])


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Item] = {}

    def do_GET(self):  # noqa: N802
        item = self.routes.get(self.path.lstrip("/"))
        if item is None:
            self.send_error(404)
            return
        if item.delay:
            time.sleep(item.delay)
        try:
            self.send_response(item.status)
            self.send_header("Content-Type", item.content_type)
            self.send_header("Content-Length", str(len(item.body)))
            self.end_headers()
            self.wfile.write(item.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


class LocalServer:
    """A request handler class served on host:<free port> from daemon threads; a context manager.
    The demo's server and the tests' hostile server share this lifecycle."""

    def __init__(self, handler, host: str = "127.0.0.1"):
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


class DemoServer(LocalServer):
    """Serves items on 127.0.0.1:<free port> from a daemon thread; use as a context manager."""

    def __init__(self, items: list[Item]):
        super().__init__(type("H", (_Handler,), {"routes": {it.name: it for it in items}}))


def refused_url() -> str:
    """A URL on a loopback port nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/refused.jpg"


def write_url_list(server: DemoServer, items: list[Item], path: Path, with_edge_rows: bool = True) -> list[str]:
    """Write the URL list parquet; returns the expected status per row, in order."""
    urls, caps, expect = [], [], []
    for it in items:
        urls.append(server.url(it.name)), caps.append(it.caption), expect.append(it.expect)
    if with_edge_rows:
        first = items[0]
        urls += [server.url(first.name), server.base + "/copy_of_" + first.name, refused_url(), "not a url", None]
        caps += ["the same url twice", "the same bytes at another url", "refused", "malformed url", "no url"]
        expect += ["ok", "ok", "failed_download", "invalid_input", "invalid_input"]
        server.httpd.RequestHandlerClass.routes["copy_of_" + first.name] = first
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(caps, pa.string())}), path)
    return expect
