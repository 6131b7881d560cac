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
