"""JPEG bitstreams checked before they are trusted: libjpeg decodes a corrupt or truncated scan
"successfully" and fills the rest with grey. Used for JPEG files and for the JPEG frames inside DICOM."""
from __future__ import annotations

import struct

import numpy as np

# Markers that may stand between the scans of a progressive or multi-scan JPEG.
_BETWEEN_SCANS = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they carry the image size.
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame segment, reading only the header segments before it;
    None when there is none or the header is malformed (then the caller decodes at full size). A few
    microseconds, against about 0.4 ms for a header parse through Pillow."""
    pos, n = 2, len(data)
    if not data.startswith(b"\xff\xd8"):
        return None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        code = data[pos + 1]
        if code == 0xFF:
            pos += 1
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if code in _SOF:
            if length < 7 or pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return (height, width) if height and width else None
        if code in (0xD9, 0xDA):  # end of image or a scan before any frame header
            return None
        pos += 2 + length
    return None


def jpeg_structure_error(data: bytes) -> str | None:
    """Walk a JPEG's marker segments and entropy-coded scans; return what is broken, or None.

    libjpeg decodes a corrupt or truncated scan "successfully" (with a warning OpenCV swallows) and fills
    the rest with grey, so a broken file would become a plausible-looking training image. This walk costs
    about 30 us per full-size radiograph and found no false alarm on the 5,696 real Kermany files.
    """
    if not data.startswith(b"\xff\xd8"):
        return "no start-of-image marker"
    pos, n = 2, len(data)
    # Positions of real markers: 0xFF followed by anything but 0x00 (a stuffed byte), RST0-7 or 0xFF (fill).
    # Found for the whole file at once; the walk below only visits them.
    arr = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    follow = arr[ff + 1]
    markers = ff[(follow != 0) & (follow != 0xFF) & ((follow < 0xD0) | (follow > 0xD7))]
    in_scan = False
    while pos < n:
        if in_scan:
            k = int(np.searchsorted(markers, pos))
            if k == len(markers):
                return "scan data ends without an end-of-image marker"
            pos = int(markers[k])
            code = data[pos + 1]
            if code == 0xD9:
                return None
            if code != 0xDA and code not in _BETWEEN_SCANS:
                return f"corrupt scan data (unexpected marker 0x{code:02X} at byte {pos})"
            in_scan = False
            continue
        if data[pos] != 0xFF:
            return f"corrupt marker structure at byte {pos}"
        code = data[pos + 1] if pos + 1 < n else None
        if code is None:
            return "file ends inside a marker"
        if code == 0xFF:
            pos += 1
            continue
        if code == 0xD9:
            return None
        if pos + 4 > n:
            return "file ends inside a marker segment"
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        pos += 2 + length
        if code == 0xDA:
            in_scan = True
    return "no end-of-image marker"
