"""Images of a run for the browser: the downloaded originals, thumbnails made lazily and cached.

Originals live in `<out>/download/NNNNN.tar` (img2dataset webdataset; shard i = manifest part i).
`_sigma.images.iter_download_images` reads a whole tar to find a key, which is what a stage wants
but not a page showing 48 random rows of a 10,000-image part. So the first look at a part indexes
its tar once (member headers and the small json members only, read through an 8 MiB buffer, so an
object-store tar costs a few ranged GETs per 8 MiB, not one per member): key -> (data offset,
size). The index is cached on local disk beside the thumbnails, keyed by the tar's size and mtime,
so a re-downloaded part is indexed again. The bytes read here are the same ones
iter_download_images yields (tested).

Decoding goes through _sigma.images.decode_image (EXIF orientation, CMYK, 16-bit, bomb limit): an
image that no longer decodes gives its reason, never an exception.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading

from _sigma import fs
from _sigma.images import IMAGE_EXTS, KEY_FIELD, decode_image, download_tar

THUMB_SIDE = 256  # long side of a grid thumbnail (px)
FULL_SIDE = 2048  # long side of the detail view's image (px); originals can be 10K+ px


class ImageError(Exception):
    """No image for this row, or it does not decode; the message says which and why."""


def default_cache_dir(out: str) -> str:
    """A local folder per run (object-store runs are never written to): $XDG_CACHE_HOME or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sigma-browse", hashlib.sha1(fs.normalize(out).encode()).hexdigest()[:16])


class Images:
    def __init__(self, out: str, cache_dir: str | None = None):
        self.out = fs.normalize(out)
        self.cache = os.path.abspath(cache_dir or default_cache_dir(self.out))
        os.makedirs(self.cache, exist_ok=True)
        self._index: dict[int, tuple[str, dict]] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _part_lock(self, part: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(part, threading.Lock())

    def _signature(self, part: int) -> str | None:
        """size-mtime of the part's tar (None when the part has no tar: every download failed)."""
        info = fs.info(download_tar(self.out, part))
        if info.type.name != "File":
            return None
        return f"{info.size}-{info.mtime_ns or 0}"

    def index(self, part: int) -> tuple[str | None, dict]:
        """(tar signature, {key: [offset, size, ext]}) of one part, built once and cached."""
        sig = self._signature(part)
        if sig is None:
            return None, {}
        with self._part_lock(part):
            have = self._index.get(part)
            if have and have[0] == sig:
                return have
            path = os.path.join(self.cache, "index", f"part-{part:05d}.{sig}.json")
            if os.path.exists(path):
                with open(path) as f:
                    idx = json.load(f)
            else:
                idx = self._scan(part)
                fs.write_text(path, json.dumps(idx))
            self._index[part] = (sig, idx)
            return sig, idx

    def _scan(self, part: int) -> dict:
        """Read the tar's member headers (and json members) once: key -> [offset, size, ext]."""
        keys, images = {}, {}
        with fs.open_input(download_tar(self.out, part)) as raw:
            buf = io.BufferedReader(raw, buffer_size=8 << 20)
            with tarfile.open(fileobj=buf, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base, _, ext = m.name.rpartition(".")
                    ext = ext.lower()
                    if ext == "json":
                        keys[base] = json.loads(tar.extractfile(m).read()).get(KEY_FIELD)
                    elif ext in IMAGE_EXTS:
                        images.setdefault(base, [m.offset_data, m.size, ext])
        return {keys[b]: v for b, v in images.items() if keys.get(b)}

    def original(self, key: str) -> bytes:
        """The downloaded bytes of `key` (raises ImageError when the run has none for it)."""
        part = int(key.split("_", 1)[0])
        _, idx = self.index(part)
        entry = idx.get(key)
        if entry is None:
            raise ImageError(f"no downloaded image for {key} in download/{part:05d}.tar")
        offset, size, _ = entry
        with fs.open_input(download_tar(self.out, part)) as f:
            f.seek(offset)
            return f.read(size)

    def thumbnail(self, key: str) -> bytes:
        """JPEG thumbnail (long side THUMB_SIDE), made on first request and cached; a failure is
        cached too (as its reason), so a broken image is decoded once, not per page view."""
        part = int(key.split("_", 1)[0])
        sig, _ = self.index(part)
        d = os.path.join(self.cache, "thumbs", f"{part:05d}", sig or "none")
        jpg, err = os.path.join(d, key + ".jpg"), os.path.join(d, key + ".err")
        if os.path.exists(jpg):
            with open(jpg, "rb") as f:
                return f.read()
        if os.path.exists(err):
            with open(err) as f:
                raise ImageError(f.read())
        try:
            im = self.decoded(key, draft=(2 * THUMB_SIDE, 2 * THUMB_SIDE))
        except ImageError as e:
            fs.write_text(err, str(e))
            raise
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        data = _jpeg(im, 85)
        fs.write_bytes(jpg, data)
        return data

    def decoded(self, key: str, draft=None):
        """RGB PIL image of `key` (ImageError with decode_image's reason when it does not decode)."""
        data = self.original(key)
        im, info = decode_image(data, draft=draft)
        if im is None:
            raise ImageError(f"image of {key} no longer decodes: {info['error']}")
        return im

    def full(self, key: str) -> bytes:
        """JPEG of the image, long side at most FULL_SIDE (EXIF-oriented, RGB)."""
        im = self.decoded(key, draft=(FULL_SIDE, FULL_SIDE))
        im.thumbnail((FULL_SIDE, FULL_SIDE))
        return _jpeg(im, 90)


def _jpeg(im, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


PLACEHOLDER_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="256" height="192" viewBox="0 0 256 192">'
                   '<rect width="256" height="192" fill="#eee"/><text x="128" y="90" font-family="sans-serif" '
                   'font-size="16" text-anchor="middle" fill="#888">no image</text><text x="128" y="115" '
                   'font-family="sans-serif" font-size="11" text-anchor="middle" fill="#aaa">{reason}</text></svg>')


def placeholder(reason: str) -> bytes:
    """Grid placeholder for a row without a usable image (reason shortened, XML-escaped)."""
    from html import escape

    return PLACEHOLDER_SVG.format(reason=escape(reason[:40])).encode()
