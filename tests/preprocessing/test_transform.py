"""The pixel transform: geometry, contrast, bit depths, channels, DICOM, and rejected inputs."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocessing.transform import (ImageRejected, TransformParams, decode, reduction_factor, transform,
                                     to_uint8)
from tests.conftest import radiograph_like


def encode(pixels: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, pixels, params or [])
    assert ok
    return buf.tobytes()


def content_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the non-black area of a (S, S, 1) image."""
    rows = np.flatnonzero(image[:, :, 0].max(axis=1) > 0)
    cols = np.flatnonzero(image[:, :, 0].max(axis=0) > 0)
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_letterbox_keeps_aspect_ratio_and_centres():
    wide = radiograph_like(1, (200, 400)) | 1  # no true-black pixels inside the content
    out = transform(encode(wide), TransformParams(size=128, resize="letterbox", contrast="none"))
    assert out.shape == (128, 128, 1) and out.dtype == np.uint8
    top, bottom, left, right = content_box(out)
    assert (left, right) == (0, 128)
    assert bottom - top == 64  # 200/400 of 128
    assert top == 32 and 128 - bottom == 32  # centred: equal black bands


def test_stretch_is_the_default():
    """Letterboxing leaves each source's aspect ratio in the image (in Kermany it tells the classes apart)."""
    assert TransformParams().resize == "stretch"
    from preprocessing.__main__ import build_parser
    assert build_parser().parse_args(["--input", "i", "--output", "o"]).resize == "stretch"


def test_stretch_fills_the_square():
    out = transform(encode(radiograph_like(2, (200, 400)) | 1), TransformParams(size=96, resize="stretch",
                                                                               contrast="none"))
    assert content_box(out) == (0, 96, 0, 96)


def test_contrast_modes():
    flat = (radiograph_like(3) // 4 + 100).astype(np.uint8)  # low contrast: values ~100..164
    data = encode(flat)
    none = transform(data, TransformParams(size=128, resize="stretch", contrast="none"))
    eq = transform(data, TransformParams(size=128, resize="stretch", contrast="equalize"))
    clahe = transform(data, TransformParams(size=128, resize="stretch", contrast="clahe"))
    assert np.ptp(eq) == 255 and eq.std() > 2 * none.std()
    assert clahe.std() > 1.3 * none.std()
    np.testing.assert_array_equal(eq[:, :, 0], cv2.equalizeHist(none[:, :, 0]))
    assert not np.array_equal(clahe, eq)


def test_letterbox_contrast_ignores_padding():
    """Equalisation runs on the content before padding, so black bands do not shift its histogram."""
    tall = radiograph_like(4, (400, 100)) | 1
    out = transform(encode(tall), TransformParams(size=128, resize="letterbox", contrast="equalize"))
    top, bottom, left, right = content_box(out)
    content = out[top:bottom, left:right, 0]
    assert content.max() == 255 and content.min() <= 5


def test_sixteen_bit_png_uses_its_range():
    base = radiograph_like(5).astype(np.uint16)
    img16 = (base * 16 + 1000).astype(np.uint16)  # a 12-bit-like radiograph stored in 16 bits
    data = encode(img16)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    out = transform(data, TransformParams(size=128, resize="stretch", contrast="none"))
    ref = transform(encode(to_uint8(base)), TransformParams(size=128, resize="stretch", contrast="none"))
    assert out.max() > 200  # stretched to its range; divided by 257 it would stay below 20
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_rgb_and_rgba_become_grey():
    grey = radiograph_like(6)
    bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA)
    bgra[:, :, 3] = 128  # alpha is dropped, not multiplied in
    params = TransformParams(size=96, contrast="none")
    expected = transform(encode(grey), params)
    np.testing.assert_array_equal(transform(encode(bgr), params), expected)
    np.testing.assert_array_equal(transform(encode(bgra), params), expected)


def test_large_jpeg_reduced_decode_matches_full_decode():
    big = cv2.resize(radiograph_like(7, (300, 240)), (1200, 1500), interpolation=cv2.INTER_CUBIC)
    data = encode(big, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert reduction_factor((1500, 1200), 224, "letterbox") == 4
    decoded = decode(data, 224, "letterbox")
    assert decoded.original_shape == (1500, 1200) and decoded.pixels.shape == (375, 300)
    params = TransformParams(size=224, resize="letterbox", contrast="none")
    fast = transform(data, params).astype(int)
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    slow = transform(encode(full), params).astype(int)
    assert np.abs(fast - slow).mean() < 2.0


def test_jpeg_frame_size_reads_the_start_of_frame_segment():
    from preprocessing.jpeg import jpeg_frame_size

    image = radiograph_like(9, (120, 200))
    for flags in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):  # baseline (SOF0) and progressive (SOF2)
        assert jpeg_frame_size(encode(image, ".jpg", flags)) == (120, 200)
    data = encode(image, ".jpg")
    sof = data.index(b"\xff\xc0")
    assert jpeg_frame_size(data[:sof]) is None  # the header ends before any frame
    assert jpeg_frame_size(data[:sof + 6]) is None  # inside the frame header
    assert jpeg_frame_size(b"\x89PNG" + data[4:]) is None and jpeg_frame_size(data[:2] + b"garbage") is None


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is text, not an image\n" * 10, "not a decodable image"),
    (encode(radiograph_like(8), ".jpg")[:2000], "corrupt or truncated JPEG"),
    (encode(radiograph_like(9, (40, 300))), "image too small"),
    (encode(np.full((100, 100), 77, np.uint8)), "blank image"),
])
def test_rejections_name_the_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        transform(data, TransformParams(size=64))


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME1", patient: str = "PAT-001",
                slope: float = 1.0, intercept: float = 0.0, window: tuple[float, float] | None = None,
                **elements):
    """An uncompressed 12-bit CR DICOM of `pixels`; `elements` sets (or, with None, removes) more header
    elements by keyword, e.g. Modality="CT", ViewPosition="PA"."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = patient, "Doe^Jane", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome1_is_inverted(tmp_path):
    grey = radiograph_like(10)
    stored = (4095 - grey.astype(np.uint16) * 16)  # MONOCHROME1: high values are dark
    path = write_dicom(tmp_path / "a.dcm", stored, "MONOCHROME1")
    decoded = decode(path.read_bytes())
    assert decoded.fmt == "dicom" and decoded.patient_id == "PAT-001"
    assert np.corrcoef(decoded.pixels.ravel().astype(float), grey.ravel().astype(float))[0, 1] > 0.99


def test_dicom_rescale_and_window_are_applied(tmp_path):
    grey = radiograph_like(11).astype(np.uint16)
    stored = grey * 10  # 0..2550
    windowed = decode(write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2", slope=2.0, intercept=-100,
                                  window=(1000, 1000)).read_bytes()).pixels

    def expected(slope: float, intercept: float) -> np.ndarray:
        """DICOM PS3.3 C.11.2.1.2: modality value = slope x stored + intercept, then the linear VOI window
        (centre c, width w) maps it to [0, 1]; the decoder stretches the result to 0..255."""
        value = slope * stored.astype(np.float64) + intercept
        out = np.clip((value - (1000 - 0.5)) / (1000 - 1) + 0.5, 0.0, 1.0)
        return (out - out.min()) * (255.0 / (out.max() - out.min()))

    assert np.abs(windowed - expected(2.0, -100)).max() <= 1.0
    # the check can fail: a decoder ignoring the slope or the intercept is off by far more than one grey level
    for wrong in (expected(1.0, -100), expected(2.0, 0), expected(1.0, 0)):
        assert np.abs(windowed - wrong).max() > 20


def test_unsupported_dicom_is_rejected(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", radiograph_like(12), photometric="PALETTE COLOR")
    with pytest.raises(ImageRejected, match="photometric"):
        transform(path.read_bytes(), TransformParams(size=64))


def test_params_validate():
    with pytest.raises(ValueError, match="resize"):
        TransformParams(resize="crop")
    with pytest.raises(ValueError, match="contrast"):
        TransformParams(contrast="gamma")
    assert TransformParams.from_dict(TransformParams(size=99).to_dict() | {"unknown": 1}).size == 99
