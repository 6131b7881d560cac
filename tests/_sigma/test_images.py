"""Every kind of bad or unusual image bytes decodes to RGB or to a precise reason."""
import io

import numpy as np
import pytest
from PIL import Image

from _sigma.images import decode_image
from curation.demo_data import bad_items

ITEMS = {it.name: it for it in bad_items()}


@pytest.mark.parametrize("name, needle", [
    ("html.jpg", "HTML"), ("empty.jpg", "0 bytes"), ("truncated.jpg", "truncated"), ("bomb.png", "decompression bomb"),
])
def test_broken_inputs_give_reasons(name, needle):
    img, info = decode_image(ITEMS[name].body)
    assert img is None and needle in info["error"]


def test_exif_orientation_applied_before_size():
    img, info = decode_image(ITEMS["exif_rotated.jpg"].body)
    assert (info["width"], info["height"]) == (400, 300) and img.size == (400, 300) and info["exif_transposed"]


def test_cmyk_16bit_palette_become_rgb():
    img, info = decode_image(ITEMS["cmyk.jpg"].body)
    assert img.mode == "RGB" and info["mode_in"] == "CMYK"
    # the green square survives the CMYK round trip: green channel dominates at the centre
    r, g, b = img.getpixel((150, 140))
    assert g > r + 60 and g > b + 60
    img, info = decode_image(ITEMS["gray16.png"].body)
    arr = np.asarray(img)
    assert info["mode_in"].startswith("I") and img.mode == "RGB"
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255  # full 16-bit range mapped onto 0..255
    img, info = decode_image(ITEMS["palette.png"].body)
    assert info["mode_in"] == "P" and img.mode == "RGB"


def test_transparent_pixels_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    b = io.BytesIO()
    rgba.save(b, "PNG")
    img, _ = decode_image(b.getvalue())
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_draft_keeps_full_size_metadata():
    big = Image.new("RGB", (1600, 1200), (10, 20, 30))
    b = io.BytesIO()
    big.save(b, "JPEG")
    img, info = decode_image(b.getvalue(), draft=(200, 200))
    assert (info["width"], info["height"]) == (1600, 1200) and img.size[0] <= 800


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    """The same bytes with the frame header (SOF0/SOF2) patched to claim width x height."""
    out = bytearray(data)
    i = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
    out[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_header_claiming_a_giant_is_failed_not_its_claimed_size(progressive):
    """Issue 22.6: a 16x16 JPEG with its SOF patched to 60000x2900 (under 1 KB) decoded 'ok' as a
    grey-filled 60000x2900 image (libjpeg fills missing data and only warns), passing min_side.
    Its scans hold far fewer bits than 60000x2900 pixels need: failed, with no size recorded."""
    data = _claim_size(_jpeg(_noise(16, 16), progressive=progressive), 60000, 2900)
    assert len(data) < 1500
    for draft in (None, (448, 448)):  # the score worker decodes with draft
        img, info = decode_image(data, draft=draft)
        assert img is None and "data ends early" in info["error"], info
        assert info["width"] is None and info["height"] is None


def test_a_jpeg_cut_short_then_closed_with_eoi_is_failed():
    """Cut to 1/20 of its bytes and closed with an EOI marker (so Pillow sees no truncation):
    libjpeg would grey-fill 95% of the image; the scan is too short for the frame -> failed."""
    full = _jpeg(Image.fromarray(np.tile(np.arange(1200, dtype=np.uint8)[None, :, None] // 5, (900, 1, 3))))
    assert decode_image(full)[1]["error"] is None
    cut = full[:len(full) // 20] + b"\xff\xd9"
    img, info = decode_image(cut)
    assert img is None and "data ends early" in info["error"], info


def test_truncated_images_fail_even_if_a_library_turned_on_load_truncated_images(monkeypatch):
    """Pillow's global LOAD_TRUNCATED_IMAGES (set True by some libraries) grey-fills a cut file."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpg = _jpeg(_noise(320, 240))
    b = io.BytesIO()
    _noise(320, 240).save(b, "PNG")
    for data in (jpg[:len(jpg) // 2], b.getvalue()[:len(b.getvalue()) // 2]):
        img, info = decode_image(data)
        assert img is None and "truncated" in info["error"], info


@pytest.mark.parametrize("size, progressive, optimize", [
    ((1600, 1200), False, False), ((1600, 1200), False, True), ((1601, 1203), True, True), ((8, 8), False, True),
])
def test_uniform_jpegs_have_just_enough_data_and_pass(size, progressive, optimize):
    """A flat image codes each block with the shortest codes: the plausibility bound must not refuse it."""
    for mode in ("RGB", "L"):
        data = _jpeg(Image.new(mode, size, 128 if mode == "L" else (10, 20, 30)), progressive=progressive,
                     optimize=optimize, quality=1 if optimize else 75, restart_marker_blocks=4)
        img, info = decode_image(data)
        assert info["error"] is None and (info["width"], info["height"]) == size and img.size == size


_PEAK = r'''
import resource, struct, sys, zlib
from _sigma.images import decode_image

def png(w, h, ch):
    """A w x h PNG written row by row (the test never holds the pixels): a grey level per row."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    z, idat = zlib.compressobj(9), []
    for y in range(h):
        idat.append(z.compress(b"\x00" + bytes([y * 7 & 255]) * (w * ch)))
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[ch], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")

n, ch = int(sys.argv[1]), int(sys.argv[2])
data = png(n, n, ch)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img, info = decode_image(data, draft=(448, 448))  # what the score worker asks for (CLIP at 224 px)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(info["width"], info["height"], img.size[0], img.size[1], (peak - base) * 1024)
'''


@pytest.mark.parametrize("channels", [3, 4])
def test_decoding_a_huge_png_for_scoring_holds_one_decoded_copy(channels):
    """Issue 22.9: a 13000x13000 PNG (under the pixel limit) cost the score worker 2.1 GB. PNG has no
    reduced-scale decode, so the pixels are decoded once (Pillow keeps RGB/RGBA at 4 bytes per pixel)
    and reduced right away: no full-size copies for orientation or mode conversion. Today: 8 (RGB) and
    13 (RGBA) bytes per pixel. Measured in a fresh process (ru_maxrss); 5000x5000 keeps the test short."""
    import subprocess
    import sys
    from pathlib import Path

    n = 5000
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(channels)], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    w, h, dw, dh, grown = map(int, res.stdout.split())
    assert (w, h) == (n, n)  # the true decoded size is recorded, not the reduced one
    assert 448 <= min(dw, dh) and max(dw, dh) < n // 2  # what the worker keeps is small
    assert grown < 4 * n * n + (48 << 20), f"{grown / n / n:.1f} bytes per pixel"  # one decoded copy + strips


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_reduced_decode_keeps_orientation_transparency_and_colours(fmt):
    """The draft path (reduce right after decoding) gives what the full decode gives, made smaller:
    the same EXIF rotation, alpha composited on white, the same colours (compared with Pillow's own
    full-size decode + reduce)."""
    from PIL import ImageOps

    base = Image.new("RGBA" if fmt == "PNG" else "RGB", (1800, 1000), (200, 30, 30, 255))
    base.paste((30, 30, 200, 255) if fmt == "PNG" else (30, 30, 200), (0, 0, 900, 1000))  # left half blue
    if fmt == "PNG":
        base.paste((0, 0, 0, 0), (0, 500, 1800, 1000))  # bottom half transparent (black underneath)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    b = io.BytesIO()
    base.save(b, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    img, info = decode_image(b.getvalue(), draft=(200, 200))
    assert (info["width"], info["height"]) == (1000, 1800) and info["exif_transposed"]
    assert img.mode == "RGB" and 200 <= img.width < 500 and img.height > img.width
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(b.getvalue())))
    if fmt == "PNG":
        white = Image.new("RGB", ref.size, (255, 255, 255))
        white.paste(ref, mask=ref.getchannel("A"))
        ref = white
    ref = ref.convert("RGB").resize(img.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(ref, np.int16))
    assert np.percentile(diff, 99) <= 8, diff.max()  # same picture (edges of reduce boxes may differ)
