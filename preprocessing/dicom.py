"""DICOM as a hospital exports it: compressed transfer syntaxes, and the header checks that keep CT slices,
unwanted views and images with burnt-in text out of a chest radiograph dataset.

Pixel data is decoded by pydicom's pixel-data plugins: its own for native and RLE data, GDCM (python-gdcm)
for JPEG Lossless, JPEG-LS and JPEG 2000, GDCM or Pillow for JPEG baseline and extended (docs/dicom.md).

Nothing from the header leaves this module except codes from DICOM's own vocabularies (modality, view
position) and the PatientID, which callers hash at once. A value outside those vocabularies is reported as
"unrecognised", never echoed: a name typed into the wrong element must not reach a manifest.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from preprocessing.jpeg import jpeg_structure_error

# Radiography modalities (DICOM PS3.3 C.7.3.1.1.1): computed and digital radiography.
RADIOGRAPHY_MODALITIES = ("CR", "DX")
ANY = "any"
UNKNOWN_VIEW = "UNKNOWN"  # ViewPosition missing or empty
OTHER_VIEW = "OTHER"      # ViewPosition holds a value outside DICOM's defined terms

# DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1, current and retired) and ViewPosition (C.8.11.5.1.1,
# DX; C.8.1.3 for CR uses the same terms). Only these are ever written to an output.
MODALITY_TERMS = frozenset(
    "AR ASMT AU BDUS BI BMD CD CF CP CR CS CT CTPROTOCOL DD DF DG DM DMS DOC DS DX EC ECG EPS ES FA FID FS GM HC HD "
    "IO IOL IVOCT IVUS KER KO LEN LP LS M3D MA MG MR MS NM OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PLAN PR "
    "PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN "
    "TEXTUREMAP TG US VA VF XA XAPROTOCOL XC".split())
VIEW_TERMS = frozenset("AP PA LL RL RLD LLD RLO LLO".split())
# BodyPartExamined (C.7.3.1) holds a Code String from a long list of defined terms (PS3.16 CID 4031) that
# vendors extend; a value is written out only when it is a well-formed Code String (at most 16 of A-Z, 0-9,
# space and underscore), which cannot carry a name or a date.
CHEST_BODY_PARTS = ("CHEST", "UNKNOWN")
UNKNOWN_BODY_PART = "UNKNOWN"  # BodyPartExamined missing or empty
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")


# Syntaxes the installed plugins do not decode, and what would (docs/dicom.md explains the choice).
MISSING_DECODERS = {
    "1.2.840.10008.1.2.4.51": "12-bit JPEG Extended needs pylibjpeg-libjpeg (GPL-3.0, not installed by default; "
                              "GDCM's 12-bit JPEG path is disabled by pydicom)",
    "1.2.840.10008.1.2.4.201": "HTJ2K needs pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "HTJ2K needs pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "HTJ2K needs pylibjpeg-openjpeg",
}


# Encapsulated JPEG with byte-stuffed Huffman scans (baseline, extended, lossless): libjpeg decodes a damaged
# frame "successfully", so its structure is walked first. JPEG-LS and JPEG 2000 codecs report damage themselves.
_JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                  "1.2.840.10008.1.2.4.70")
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


class DicomRejected(ValueError):
    """A DICOM file that cannot become a training image; the message is the reason (no header values)."""


@dataclass(frozen=True)
class DicomImage:
    """A decoded single-frame greyscale DICOM: display-ready float pixels (modality LUT and VOI window applied,
    MONOCHROME1 inverted), and the header facts cxrscale records."""

    values: np.ndarray
    shape: tuple[int, int]
    patient_id: str | None
    modality: str
    view: str
    burned_in: str  # "YES", "NO" or "absent"
    transfer_syntax: str
    acquired: str | None = None  # acquisition time, YYYYMMDDHHMMSS (`acquisition_time`); a date: never written out


def parse_codes(text: str, option: str, vocabulary: frozenset[str] | None = None) -> tuple[str, ...]:
    """'PA, ap' -> ('PA', 'AP'): a comma-separated list of DICOM codes for `option`; 'any' -> () (no check)."""
    codes = tuple(dict.fromkeys(c.strip().upper() for c in text.split(",") if c.strip()))
    if not codes:
        raise ValueError(f"{option} needs at least one code (or {ANY})")
    if codes == (ANY.upper(),):
        return ()
    if vocabulary is not None:
        unknown = [c for c in codes if c not in vocabulary]
        if unknown:
            raise ValueError(f"{option}: {', '.join(unknown)} not among DICOM's defined terms "
                             f"({', '.join(sorted(vocabulary))})")
    malformed = [c for c in codes if not _CODE_STRING.fullmatch(c)]
    if malformed:
        raise ValueError(f"{option}: {', '.join(malformed)} is not a DICOM Code String (at most 16 of A-Z, 0-9, "
                         "space and underscore)")
    return codes


def _code(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = value[0] if len(value) else ""
    return str(value or "").strip().upper()


def body_part(ds) -> str:
    """BodyPartExamined as a code: the value, UNKNOWN when absent, "unrecognised" when not a Code String."""
    value = _code(ds, "BodyPartExamined")
    return UNKNOWN_BODY_PART if not value else (value if _CODE_STRING.fullmatch(value) else "unrecognised")


def acquisition_time(ds) -> str | None:
    """When the image was taken, as a sortable YYYYMMDDHHMMSS string: AcquisitionDateTime, else
    AcquisitionDate (+ AcquisitionTime), ContentDate (+ ContentTime), StudyDate (+ StudyTime); None when
    none holds a well-formed date. Only --split-by time uses it; it never reaches an output."""
    stamp = re.sub(r"\D", "", str(ds.get("AcquisitionDateTime", "") or ""))[:14]
    if len(stamp) < 8:
        for date, time in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"),
                           ("StudyDate", "StudyTime")):
            day = re.sub(r"\D", "", str(ds.get(date, "") or ""))
            if len(day) == 8:
                stamp = day + re.sub(r"\D", "", str(ds.get(time, "") or "").split(".")[0])[:6]
                break
    if len(stamp) < 8:
        return None
    return stamp.ljust(14, "0")


def header_facts(ds) -> tuple[str, str, str]:
    """(modality, view, burned-in) of a dataset, each a code from DICOM's vocabularies or a cxrscale marker."""
    modality = _code(ds, "Modality")
    modality = modality if modality in MODALITY_TERMS else ("missing" if not modality else "unrecognised")
    view = _code(ds, "ViewPosition")
    view = view if view in VIEW_TERMS else (UNKNOWN_VIEW if not view else OTHER_VIEW)
    burned = _code(ds, "BurnedInAnnotation")
    burned = burned if burned in ("YES", "NO") else "absent"
    return modality, view, burned


def check_header(modality: str, view: str, burned: str, modalities: tuple[str, ...], views: tuple[str, ...],
                 allow_burned_in: bool, part: str = UNKNOWN_BODY_PART, body_parts: tuple[str, ...] = ()) -> None:
    """Raise `DicomRejected` unless the header passes --modalities, --views, --body-parts and the burnt-in text
    rule."""
    if modalities and modality not in modalities:
        raise DicomRejected(f"modality {modality} is not in --modalities {','.join(modalities)}")
    if body_parts and part not in body_parts:
        raise DicomRejected(f"body part examined {part} is not in --body-parts {','.join(body_parts)}")
    if views and view not in views:
        raise DicomRejected(f"view position {view} is not accepted by --views {','.join(views)}")
    if burned == "YES" and not allow_burned_in:
        raise DicomRejected("BurnedInAnnotation is YES: text burnt into the pixels can identify the patient "
                            "(--allow-burned-in-annotation accepts such images)")


def _count(ds, keyword: str, default: int = 1) -> int:
    """An integer element (NumberOfFrames, BitsStored); a malformed value is rejected without being echoed."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise DicomRejected(f"malformed DICOM element {keyword}") from None


def _syntax_name(uid) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid or "unknown")


def _check_jpeg_frames(ds, syntax) -> None:
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as err:  # noqa: BLE001 - a broken encapsulation
        raise DicomRejected(f"corrupt encapsulated pixel data ({type(err).__name__})") from None
    for frame in frames:
        problem = jpeg_structure_error(bytes(frame).rstrip(b"\x00"))  # fragments are padded to even lengths
        if problem:
            raise DicomRejected(f"corrupt or truncated JPEG in the DICOM pixel data (transfer syntax "
                                f"{_syntax_name(syntax)}): {problem}")


def decode_dicom(data: bytes, modalities: tuple[str, ...] = RADIOGRAPHY_MODALITIES, views: tuple[str, ...] = (),
                 allow_burned_in: bool = False, body_parts: tuple[str, ...] = CHEST_BODY_PARTS) -> DicomImage:
    """Read, check and decode one DICOM file's bytes; raises `DicomRejected` with the reason.

    The header is checked before any pixel is decoded, so a CT series costs a header read per file.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise DicomRejected(f"unreadable DICOM ({type(err).__name__}: {first})") from None
    if "PixelData" not in ds:
        if _PIXEL_DATA_TAG in data[132:]:
            raise DicomRejected("truncated DICOM: the file ends inside its pixel data")
        raise DicomRejected("DICOM without pixel data")
    modality, view, burned = header_facts(ds)
    check_header(modality, view, burned, modalities, views, allow_burned_in, body_part(ds), body_parts)
    photometric = _code(ds, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric if photometric in ("RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                                               "YBR_RCT", "YBR_PARTIAL_420") else ("missing" if not photometric
                                                                                   else "unrecognised")
        raise DicomRejected(f"unsupported DICOM photometric interpretation {shown}: only greyscale "
                            "(MONOCHROME1/2) radiographs are used")
    frames = _count(ds, "NumberOfFrames")
    if frames > 1:
        raise DicomRejected(f"multi-frame DICOM ({frames} frames) is not supported")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if str(syntax) in _JPEG_SYNTAXES:
        _check_jpeg_frames(ds, syntax)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - e.g. a transfer syntax no installed plugin decodes
        why = MISSING_DECODERS.get(str(syntax))
        if str(syntax) == "1.2.840.10008.1.2.4.51" and _count(ds, "BitsStored", 8) <= 8:
            why = None  # 8-bit JPEG Extended is decoded by GDCM or Pillow: this is another failure
        why = why or f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise DicomRejected(f"undecodable DICOM pixel data (transfer syntax {_syntax_name(syntax)}: {why})") from None
    if pixels.ndim != 2:
        raise DicomRejected(f"DICOM pixel data of shape {pixels.shape} is not a single grey frame")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    patient = ds.get("PatientID")
    return DicomImage(values, pixels.shape, str(patient) if patient else None, modality, view, burned,
                      str(syntax or "unknown"), acquisition_time(ds))
