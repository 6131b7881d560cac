"""Does a JPEG hold enough coded data for the frame its header declares? (used by _sigma.images)

libjpeg, when a scan's data ends early (an EOI or another marker where coded blocks should be),
fills the missing blocks with zeros and only emits a warning, which Pillow drops: a 16x16 JPEG
whose SOF is patched to 60000x2900 decodes "fine" as a grey 60000x2900 image. Pillow cannot tell
us, so we bound it from the file's structure, without decoding:

Every Huffman-coded block costs at least one DC code in a scan that carries DC (baseline, or
the progressive DC-first scan) and, in a sequential scan, at least one AC code (EOB or a
coefficient); each code is at least the shortest code length of its table (from the DHT
segments). DC refinement scans cost exactly one bit per block. So a scan needs at least
sum(blocks x shortest codes) bits; fewer coded bytes than that means the data ends early.
This is a lower bound: it never refuses a complete file, and catches a header that claims far
more pixels than the data holds. A file cut partway and closed with an EOI can still satisfy it
(then the missing part decodes grey; see README, Reliability). Arithmetic-coded (SOF9-15) and
lossless (SOF3/7) files, and anything this walk does not understand, are left to the decoder.
"""
from __future__ import annotations

import re

_SOF_HUFFMAN = {0xC0: "sequential", 0xC1: "sequential", 0xC2: "progressive", 0xC5: "sequential",
                0xC6: "progressive"}  # C3/C7 lossless, C9-CF arithmetic: not bounded here
_SOF_OTHER = {0xC3, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # ends a scan's coded data (not stuffing, RSTn or fill)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def scan_shortfall(data: bytes) -> str | None:
    """Why `data` cannot hold the frame it declares ("scan 1 has 612 coded bytes, the 60000x2900
    frame needs at least 1023750"), or None (enough data, or nothing this bound applies to)."""
    try:
        return _walk(data)
    except (IndexError, ValueError, KeyError, ZeroDivisionError):
        return None  # malformed structure: the decoder says what is wrong


def _walk(data: bytes) -> str | None:
    if data[:2] != b"\xff\xd8":
        return None
    shortest: dict[tuple[int, int], int] = {}  # (class 0=DC 1=AC, table id) -> shortest code length
    frame = None  # (kind, width, height, {component id: (h, v)}, hmax, vmax)
    i, n, scan = 2, len(data), 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if m == 0xD9:  # EOI
            return None
        if 0xD0 <= m <= 0xD7 or m == 0x01:  # standalone markers
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        seg = data[i + 4:i + 2 + length]
        if m in _SOF_OTHER:
            return None
        if m in _SOF_HUFFMAN:
            h, w, nf = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            comps = {seg[6 + 3 * k]: (seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(nf)}
            if h == 0 or w == 0:  # height given later by DNL: not bounded
                return None
            frame = (_SOF_HUFFMAN[m], w, h, comps, max(c[0] for c in comps.values()),
                     max(c[1] for c in comps.values()))
        elif m == 0xC4:  # DHT: one or more tables
            j = 0
            while j + 17 <= len(seg):
                counts = seg[j + 1:j + 17]
                lengths = [k + 1 for k, c in enumerate(counts) if c]
                if lengths:
                    shortest[(seg[j] >> 4, seg[j] & 15)] = lengths[0]
                j += 17 + sum(counts)
        elif m == 0xDA:  # SOS, then its coded data up to the next real marker
            if frame is None:
                return None
            start = i + 2 + length
            found = _MARKER.search(data, start)
            end = found.start() if found else n
            scan += 1
            need = _scan_bits(frame, seg, shortest)
            if need and (end - start) * 8 < need:
                kind, w, h = frame[:3]
                return (f"data ends early: scan {scan} has {end - start} coded bytes, the {w}x{h} frame "
                        f"needs at least {_ceil(need, 8)}")
            i = end
            continue
        i += 2 + length
    return None


def _scan_bits(frame, sos: bytes, shortest: dict) -> int:
    """Lower bound on the coded bits of one scan (0 where no bound applies: progressive AC scans,
    whose end-of-band runs can skip any number of blocks)."""
    kind, w, h, comps, hmax, vmax = frame
    ns = sos[0]
    members = [(sos[1 + 2 * k], sos[2 + 2 * k] >> 4, sos[2 + 2 * k] & 15) for k in range(ns)]
    ss, se, ah = sos[1 + 2 * ns], sos[2 + 2 * ns], sos[3 + 2 * ns] >> 4
    if ss != 0:
        return 0
    if ns == 1:  # non-interleaved: the component's own block grid
        ch, cv = comps[members[0][0]]
        blocks = {members[0][0]: _ceil(_ceil(w * ch, hmax), 8) * _ceil(_ceil(h * cv, vmax), 8)}
    else:  # interleaved: every MCU holds h x v blocks of each component
        mcus = _ceil(w, 8 * hmax) * _ceil(h, 8 * vmax)
        blocks = {cid: mcus * comps[cid][0] * comps[cid][1] for cid, _, _ in members}
    bits = 0
    for cid, td, ta in members:
        if ah:  # DC successive-approximation refinement: one raw bit per block
            per = 1
        else:
            per = shortest.get((0, td), 1)
            if kind == "sequential" and se > 0:
                per += shortest.get((1, ta), 1)
        bits += blocks[cid] * per
    return bits
