"""Downloaded images: read them from the download tars, decode them into RGB or say precisely why not.

Used by every stage that reads images (score, caption, features, eval) so they all agree on
where the originals are, orientation, colour handling and what counts as broken. Never raises for
bad bytes. `iter_download_images` is the only reader of `<output>/download/NNNNN.tar` (written by
img2dataset in the download stage; shard i holds the images of manifest part i).
"""
from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import warnings
import zlib
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from _sigma.jpegscan import scan_shortfall

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's error threshold: 2 x Image.MAX_IMAGE_PIXELS


def _sniff(data: bytes) -> str | None:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "not an image: HTML page"
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in data[:4096].lower()):
        return "unsupported image format: SVG (vector graphics; no rasteriser in the pipeline)"
    if head.startswith((b"{", b"[")):
        return "not an image: JSON"
    if data[4:8] == b"ftyp":  # ISO-BMFF: HEIC (HEVC inside) has no decoder here; AVIF does
        size = int.from_bytes(data[:4], "big")
        brands = {data[i:i + 4] for i in range(8, min(max(size, 16), 256), 4)} - {b"\x00\x00\x00\x00"}
        if brands & _HEIC_BRANDS and not brands & {b"avif", b"avis"}:
            return "unsupported image format: HEIC/HEIF (HEVC-coded; no HEIF decoder installed)"
    return None


_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}


def _unidentified(data: bytes) -> str:
    """The reason for bytes Pillow cannot open (never Pillow's message: it embeds a BytesIO repr)."""
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        return f"unsupported image format: ISO media file (brand {brand!r})"
    if data[:2] == b"\x1f\x8b":
        return "not an image: gzip-compressed data"
    return f"cannot identify image format (first bytes {data[:8].hex(' ')})"


_WIDE = ("I;16", "I;16B", "I;16L", "I", "F")


def _wide_scale(im: Image.Image) -> float:
    """The value that maps to 255 for a 16/32-bit image (decided on the whole image, not a strip)."""
    if im.mode.startswith("I;16"):
        return 65535.0
    hi = im.getextrema()[1]
    return 65535.0 if hi is not None and hi > 255 else 255.0


def _to_rgb(im: Image.Image, hi: float | None = None) -> Image.Image:
    """Convert any mode to 8-bit RGB: alpha on white, 16-bit scaled, CMYK via Pillow's transform.
    Per pixel (hi: the wide modes' scale, see _wide_scale), so converting strips = converting the whole."""
    if im.mode in _WIDE:
        arr = np.asarray(im, dtype=np.float64)
        hi = hi or _wide_scale(im)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # convert() would copy an RGBA image
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB") if im.mode != "RGB" else im


def _clean(e: Exception) -> str:
    """An exception's message without object reprs (`<_io.BytesIO object at 0x...>`), bounded."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the data", str(e))[:200]


def probe_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open without decoding pixels: (PIL image | None, info). Checks the bomb limit before load."""
    info = {"width": None, "height": None, "mode_in": None, "format": None, "exif_transposed": False, "error": None}
    if data is None or len(data) == 0:
        info["error"] = "empty file (0 bytes)"
        return None, info
    sniffed = _sniff(data)
    if sniffed:
        info["error"] = sniffed
        return None, info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        info["error"] = f"decompression bomb: {e}"
        return None, info
    except UnidentifiedImageError:
        info["error"] = _unidentified(data)
        return None, info
    except (OSError, ValueError, SyntaxError) as e:
        info["error"] = f"cannot identify image: {_clean(e)}"
        return None, info
    info["mode_in"], info["format"] = im.mode, im.format
    w, h = im.size
    if w * h > max_pixels:
        info["error"] = f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        return None, info
    return im, info


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None):
    """(RGB PIL image | None, info). width/height are those of the decoded pixels, after EXIF
    orientation; None when the pixels do not decode (a header alone proves nothing).

    `draft` (w, h): only a version at least this large is needed (scoring, thumbnails). JPEG then
    decodes at 1/2..1/8 scale; any image still over twice `draft` is box-reduced strip by strip
    right after decoding, so the caller never holds more than the one decoded copy (Pillow keeps
    RGB/RGBA at 4 bytes per pixel) plus the small result. width/height still describe the full
    image (the reduced decode covered all of its data).
    """
    im, info = probe_image(data, max_pixels)
    if im is None:
        return None, info
    if im.format == "JPEG":
        short = scan_shortfall(data)  # libjpeg grey-fills a frame its data does not cover, silently
        if short:
            info["error"] = f"truncated JPEG: {short}"
            return None, info
    try:
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        full = im.size
        if draft and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            im.draft(im.mode, draft)  # decode at 1/2, 1/4 or 1/8 scale: much faster for big JPEGs
        # A library may have turned this global on (grey-fills cut files); the pipeline never wants it.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
        w, h = _decoded_size(im.size, full)
        if draft:
            im = _shrink(im, draft)
        transposed = orientation in _ORIENT
        if transposed:  # by the tag read above: a reduced image has no EXIF left to read
            im = im.transpose(_ORIENT[orientation])
        rgb = _to_rgb(im)
    except Image.DecompressionBombError as e:
        info["error"] = f"decompression bomb: {e}"
        return None, info
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        info["error"] = f"decode failed: {_clean(e)}"
        return None, info
    if orientation in (5, 6, 7, 8):  # 90/270 degree rotations swap the axes
        w, h = h, w
    info["width"], info["height"], info["exif_transposed"] = w, h, transposed
    return rgb, info


def _decoded_size(decoded: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
    """The full-scale size the decoded pixels stand for: `full` when they are it or its JPEG 1/s
    scale (ceil(full / s)), else what was decoded."""
    for s in (1, 2, 4, 8):
        if decoded == (-(-full[0] // s), -(-full[1] // s)):
            return full
    return decoded


_T = Image.Transpose
_ORIENT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
           7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # EXIF orientation -> the transpose that undoes it
_STRIP_PIXELS = 1 << 20  # input pixels per reduction strip: ~4 MB of RGBA, whatever the image size


def _shrink(im: Image.Image, draft: tuple[int, int]) -> Image.Image:
    """An RGB box-reduction of a decoded image by the largest integer factor that keeps it at least
    `draft`, or `im` itself when under 2x. Converted and reduced in strips of whole boxes, so no
    full-size converted copy exists (RGBA -> RGB on white, P -> RGB, ... cost a strip each)."""
    factor = min(im.width // max(draft[0], 1), im.height // max(draft[1], 1))
    if factor < 2:
        return im
    hi = _wide_scale(im) if im.mode in _WIDE else None
    out = Image.new("RGB", (-(-im.width // factor), -(-im.height // factor)))
    rows = factor * max(1, _STRIP_PIXELS // (im.width * factor))  # a multiple of factor: boxes stay whole
    for y in range(0, im.height, rows):
        strip = _to_rgb(im.crop((0, y, im.width, min(y + rows, im.height))), hi)
        out.paste(strip.reduce(factor), (0, y // factor))
    return out


DOWNLOAD = "download"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}
KEY_FIELD = "sigma_key"  # our key rides through img2dataset as an extra column (it owns `key`)


def download_tar(out: str, part: int) -> str:
    from _sigma import fs

    return fs.join(fs.normalize(out), DOWNLOAD, f"{part:05d}.tar")


def iter_download_images(out: str, part: int, keys: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, original image bytes) of the downloaded images of part `part`, in tar order; only
    `keys` when given. Nothing when the part has no tar (every download of it failed). A truncated
    or corrupt tar ends the iteration early with a warning on stderr, never an exception: the rows
    not yielded are the callers' "missing from the tar" rows (download_tar_problem says why)."""
    from _sigma import fs

    uri = download_tar(out, part)
    if not fs.exists(uri):
        return
    try:
        yield from _iter_tar(uri, keys)
    except _TAR_ERRORS as e:
        print(f"warning: download tar {uri} is unreadable from here on ({_clean(e)}); its remaining "
              "images are treated as missing", file=sys.stderr, flush=True)


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)


def _iter_tar(uri: str, keys: set[str] | None) -> Iterator[tuple[str, bytes]]:
    from _sigma import fs

    pending: dict[str, dict] = {}
    with fs.open_input(uri) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, _, ext = member.name.rpartition(".")
            ext = ext.lower()
            if ext != "json" and ext not in IMAGE_EXTS:
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"unexpected end of data in {member.name}")
            entry = pending.setdefault(base, {})
            if ext == "json":
                entry["key"] = json.loads(data).get(KEY_FIELD)
            else:
                entry["image"] = data
            if "key" in entry and "image" in entry:
                del pending[base]
                if keys is None or entry["key"] in keys:
                    yield entry["key"], entry["image"]


def download_tar_problem(out: str, part: int) -> str | None:
    """Why part's download tar cannot be read to the end (naming the file), or None."""
    from _sigma import fs

    uri = download_tar(out, part)
    if not fs.exists(uri):
        return f"download tar {uri} is missing"
    n = 0
    try:
        for _ in _iter_tar(uri, None):
            n += 1
    except _TAR_ERRORS as e:
        return f"download tar {uri} is corrupt after {n} images ({_clean(e)})"
    return None
