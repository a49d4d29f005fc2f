"""DICOM as a PACS exports it: every compressed transfer syntax, written here by GDCM, pydicom and OpenCV, and
checked against the uncompressed original; the modality, view and burnt-in text rules; clear rejections."""
from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from preprocessing import dicom
from preprocessing.__main__ import build_parser
from preprocessing.transform import ImageRejected, TransformParams, decode, transform
from tests.conftest import radiograph_like
from tests.preprocessing.test_transform import write_dicom


def stored_12bit(seed: int, shape=(260, 220)) -> np.ndarray:
    """A 12-bit radiograph-like image that uses every bit (lossless codecs must keep the low ones)."""
    noise = np.random.default_rng(seed).integers(0, 16, shape)
    return (radiograph_like(seed, shape).astype(np.uint16) * 16 + noise).astype(np.uint16)


def recompress(src, dst, syntax: str):
    """Re-encode a DICOM file in a GDCM transfer syntax (gdcm.TransferSyntax.<syntax>), header kept."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst
    return dst


def compress(src, dst, syntax: str):
    """`src` in the named syntax: RLE by pydicom's own encoder, JPEG baseline as an OpenCV JPEG encapsulated
    (8-bit), the rest by GDCM."""
    if syntax == "RLELossless":
        ds = pydicom.dcmread(src)
        ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
        ds.save_as(dst)
        return dst
    if syntax == "JPEGBaseline8Bit":
        ds = pydicom.dcmread(src)
        eight = (ds.pixel_array >> 4).astype(np.uint8)
        ok, jpeg = cv2.imencode(".jpg", eight, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([jpeg.tobytes()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
        ds.save_as(dst)
        return dst
    return recompress(src, dst, syntax)


LOSSLESS = {  # gdcm / pydicom name -> DICOM UID
    "JPEGLosslessProcess14": "1.2.840.10008.1.2.4.57",
    "JPEGLosslessProcess14_1": "1.2.840.10008.1.2.4.70",  # the usual lossless syntax of CR and DX
    "JPEGLSLossless": "1.2.840.10008.1.2.4.80",
    "JPEG2000Lossless": "1.2.840.10008.1.2.4.90",
    "RLELossless": "1.2.840.10008.1.2.5",
}
LOSSY = {
    "JPEGBaseline8Bit": "1.2.840.10008.1.2.4.50",
    "JPEGLSNearLossless": "1.2.840.10008.1.2.4.81",
    "JPEG2000": "1.2.840.10008.1.2.4.91",
}


@pytest.mark.parametrize("syntax", sorted(LOSSLESS))
def test_lossless_syntaxes_decode_exactly(tmp_path, syntax):
    stored = stored_12bit(1)
    raw = write_dicom(tmp_path / "raw.dcm", stored, "MONOCHROME2", ViewPosition="PA", Modality="DX")
    packed = compress(raw, tmp_path / "packed.dcm", syntax)
    ds = pydicom.dcmread(packed)
    assert ds.file_meta.TransferSyntaxUID == LOSSLESS[syntax]
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(ds.pixel_array, stored)
    original, decoded = decode(raw.read_bytes()), decode(packed.read_bytes())
    np.testing.assert_array_equal(decoded.pixels, original.pixels)
    assert (decoded.transfer_syntax, decoded.view, decoded.modality) == (LOSSLESS[syntax], "PA", "DX")
    params = TransformParams(size=64)
    np.testing.assert_array_equal(transform(packed.read_bytes(), params), transform(raw.read_bytes(), params))


@pytest.mark.parametrize("syntax", sorted(LOSSY))
def test_lossy_syntaxes_decode_close_to_the_original(tmp_path, syntax):
    stored = stored_12bit(2)
    raw = write_dicom(tmp_path / "raw.dcm", stored, "MONOCHROME2")
    packed = compress(raw, tmp_path / "packed.dcm", syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == LOSSY[syntax]
    original, decoded = decode(raw.read_bytes()).pixels.astype(int), decode(packed.read_bytes()).pixels.astype(int)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < 2.0, syntax  # of 255: what a diagnostic-quality codec keeps
    assert np.corrcoef(decoded.ravel(), original.ravel())[0, 1] > 0.995


def test_undecodable_syntaxes_are_rejected_naming_them(tmp_path):
    """12-bit JPEG Extended and HTJ2K have no decoder in the default stack (docs/dicom.md): the rejection names
    the syntax and what would decode it."""
    raw = write_dicom(tmp_path / "raw.dcm", stored_12bit(3), "MONOCHROME2")
    recompress(raw, tmp_path / "jpeg12.dcm", "JPEGExtendedProcess2_4")  # GDCM encodes it; decoding it crashes GDCM
    with pytest.raises(ImageRejected, match=r"transfer syntax JPEG Extended \(Process 2 and 4\) "
                                            r"\(1\.2\.840\.10008\.1\.2\.4\.51\): 12-bit JPEG Extended needs "
                                            r"pylibjpeg-libjpeg"):
        decode((tmp_path / "jpeg12.dcm").read_bytes())
    ds = pydicom.dcmread(raw)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    ds.save_as(tmp_path / "htj2k.dcm")
    with pytest.raises(ImageRejected, match=r"undecodable DICOM pixel data \(transfer syntax High-Throughput JPEG "
                                            r"2000 .*\(1\.2\.840\.10008\.1\.2\.4\.201\)"):
        decode((tmp_path / "htj2k.dcm").read_bytes())
    with pytest.raises(ImageRejected, match=r"HTJ2K needs pylibjpeg-openjpeg"):
        decode((tmp_path / "htj2k.dcm").read_bytes())


def test_modality_view_and_burned_in_rules(tmp_path):
    image = stored_12bit(4)

    def attempt(params=None, **elements):
        path = write_dicom(tmp_path / "x.dcm", image, "MONOCHROME2", **elements)
        return decode(path.read_bytes(), params=params)

    with pytest.raises(ImageRejected, match=r"^modality CT is not in --modalities CR,DX$"):
        attempt(Modality="CT")
    assert attempt(TransformParams(modalities=()), Modality="CT").modality == "CT"
    with pytest.raises(ImageRejected, match=r"^modality missing is not in --modalities CR,DX$"):
        attempt(Modality=None)
    # A value outside DICOM's terms is never echoed: it could be anything, a name included.
    with pytest.raises(ImageRejected, match=r"^modality unrecognised is not in") as err:
        attempt(Modality="SMITH")
    assert "SMITH" not in str(err.value)
    assert attempt(Modality="DX", ViewPosition="AP").view == "AP"
    assert attempt().view == dicom.UNKNOWN_VIEW
    assert attempt(ViewPosition="JONES").view == dicom.OTHER_VIEW
    only_pa = TransformParams(views=("PA",))
    assert attempt(only_pa, ViewPosition="PA").view == "PA"
    with pytest.raises(ImageRejected, match=r"^view position AP is not accepted by --views PA$"):
        attempt(only_pa, ViewPosition="AP")
    with pytest.raises(ImageRejected, match=r"view position UNKNOWN is not accepted"):
        attempt(only_pa)
    with pytest.raises(ImageRejected, match=r"^BurnedInAnnotation is YES: .*--allow-burned-in-annotation"):
        attempt(BurnedInAnnotation="YES")
    assert attempt(TransformParams(allow_burned_in_annotation=True), BurnedInAnnotation="YES").burned_in == "YES"
    assert attempt(BurnedInAnnotation="NO").burned_in == "NO"
    # The checks live in the transform's parameters, so prediction applies the training data's rules.
    restored = TransformParams.from_dict(only_pa.to_dict())
    assert restored == only_pa and restored.to_dict()["views"] == ["PA"]
    assert TransformParams.from_dict({"size": 64}).modalities == ()  # a manifest from before these rules


def test_body_part_rule(tmp_path):
    image = stored_12bit(5)

    def attempt(params=None, **elements):
        path = write_dicom(tmp_path / "x.dcm", image, "MONOCHROME2", **elements)
        return decode(path.read_bytes(), params=params)

    attempt(BodyPartExamined="CHEST")
    attempt()  # no BodyPartExamined: left to the out-of-distribution guard
    with pytest.raises(ImageRejected, match=r"^body part examined EXTREMITY is not in --body-parts CHEST,UNKNOWN$"):
        attempt(BodyPartExamined="extremity")
    with pytest.raises(ImageRejected, match=r"^body part examined unrecognised is not in") as err:
        attempt(BodyPartExamined="Dr. Smith's knee")  # not a Code String: never echoed
    assert "Smith" not in str(err.value)
    attempt(TransformParams(body_parts=()), BodyPartExamined="EXTREMITY")
    with pytest.raises(ImageRejected, match="body part examined UNKNOWN"):
        attempt(TransformParams(body_parts=("CHEST",)))
    assert TransformParams.from_dict({"size": 64, "modalities": ["CR"]}).body_parts == ()  # an older manifest
    assert TransformParams.from_dict(TransformParams().to_dict()).body_parts == ("CHEST", "UNKNOWN")


def test_real_dicoms_of_other_anatomy_are_refused_by_their_headers(shared_data):
    """The NEMA WG04 radiographs: the adult chest CR passes, the extremity CR is refused by its body part and
    the head CT by its modality, with the reason and no header value beyond the codes."""
    folder = shared_data / "dicom-real"
    params = TransformParams(size=64)
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        assert decode(folder.joinpath(name).read_bytes(), params=params).modality == "CR"
    with pytest.raises(ImageRejected, match=r"^body part examined EXTREMITY is not in --body-parts"):
        decode(folder.joinpath("RG3_J2KR.dcm").read_bytes(), params=params)
    with pytest.raises(ImageRejected, match=r"^modality CT is not in --modalities"):
        decode(folder.joinpath("693_J2KR.dcm").read_bytes(), params=params)


def test_multiframe_colour_truncated_and_unreadable_keep_their_reasons(tmp_path):
    frames = np.stack([stored_12bit(5), stored_12bit(6)])
    path = write_dicom(tmp_path / "multi.dcm", frames.reshape(-1, frames.shape[2]), "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.Rows = 2, frames.shape[1]
    ds.save_as(path)
    with pytest.raises(ImageRejected, match=r"^multi-frame DICOM \(2 frames\) is not supported$"):
        decode(path.read_bytes())
    rgb = write_dicom(tmp_path / "rgb.dcm", stored_12bit(7), "RGB")
    with pytest.raises(ImageRejected, match=r"photometric interpretation RGB: only greyscale"):
        decode(rgb.read_bytes())
    good = write_dicom(tmp_path / "good.dcm", stored_12bit(8), "MONOCHROME2").read_bytes()
    with pytest.raises(ImageRejected, match=r"DICOM"):
        decode(good[: len(good) // 2], name="cut.dcm")
    with pytest.raises(ImageRejected, match=r"pixel data is less than expected"):
        decode(good[: len(good) - 100], name="cut.dcm")
    with pytest.raises(ImageRejected, match=r"^DICOM without pixel data$"):
        decode(good[:400], name="header-only.dcm")
    odd = write_dicom(tmp_path / "odd.dcm", stored_12bit(9), "MONOCHROME2")
    ds = pydicom.dcmread(odd)
    ds.add_new(0x00280008, "IS", "1")
    ds["NumberOfFrames"]._value = "SMITH"  # not an integer, and a name: refused, never echoed
    ds.save_as(odd)
    with pytest.raises(ImageRejected, match=r"^malformed DICOM element NumberOfFrames$"):
        decode(odd.read_bytes())
    jpeg = compress(tmp_path / "good.dcm", tmp_path / "jpeg.dcm", "JPEGBaseline8Bit")
    with pytest.raises(ImageRejected, match=r"^truncated DICOM: the file ends inside its pixel data$"):
        decode(jpeg.read_bytes()[:-300], name="cut.dcm")
    # A JPEG frame cut short inside an intact encapsulation: libjpeg would decode it, grey-filled, without error.
    ds = pydicom.dcmread(jpeg)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(tmp_path / "cut-frame.dcm")
    with pytest.raises(ImageRejected, match=r"^corrupt or truncated JPEG in the DICOM pixel data \(transfer syntax "
                                            r"JPEG Baseline"):
        decode((tmp_path / "cut-frame.dcm").read_bytes())


def test_cli_codes_are_checked(capsys):
    parser = build_parser()
    args = parser.parse_args(["--input", "i", "--output", "o", "--views", "pa, AP", "--modalities", "any"])
    assert args.views == ("PA", "AP") and args.modalities == ()
    assert parser.parse_args(["--input", "i", "--output", "o"]).modalities == ("CR", "DX")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--input", "i", "--output", "o", "--views", "PA,LATERAL"])
    assert stop.value.code == 2
    assert "--views: LATERAL not among DICOM's defined terms" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs at least one code"):
        dicom.parse_codes(" , ", "--modalities")
    assert parser.parse_args(["--input", "i", "--output", "o"]).body_parts == ("CHEST", "UNKNOWN")
    assert parser.parse_args(["--input", "i", "--output", "o", "--body-parts", "chest,thorax"]).body_parts == \
        ("CHEST", "THORAX")
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "i", "--output", "o", "--body-parts", "CHEST;HEAD"])
    assert "--body-parts: CHEST;HEAD is not a DICOM Code String" in capsys.readouterr().err


# --- a PACS export end to end: prepare, evaluate, predict; no header value in any output ---------------------

PN = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "RequestingPhysician",
      "NameOfPhysiciansReadingStudy", "PatientMotherBirthName")
TEXT = ("OtherPatientIDs", "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "InstitutionName",
        "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "ProtocolName",
        "PatientAddress", "PatientTelephoneNumbers", "PatientComments", "ImageComments", "DerivationDescription",
        "AdmittingDiagnosesDescription", "MilitaryRank", "EthnicGroup", "Occupation", "IssuerOfPatientID",
        "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "PatientReligiousPreference",
        "AdditionalPatientHistory", "RequestedProcedureDescription", "PerformedProcedureStepDescription")
DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def planted(n: int) -> dict[str, str]:
    """A value no output may contain, in every identifying text element of file n (tokens unique per file and
    element; SH elements take at most 16 characters)."""
    values = {kw: f"Phi{n:03d}^Name{k:02d}" for k, kw in enumerate(PN)}
    values |= {kw: f"PHI{n:03d}T{k:02d}" for k, kw in enumerate(TEXT)}
    values |= {kw: f"18{n % 90 + 10:02d}0{k + 1}2{k}" for k, kw in enumerate(DATES)}
    values |= {kw: f"1.2.826.0.1.3680043.9999.{n}.{k}" for k, kw in enumerate(UIDS)}
    values |= {"PatientID": f"PHIID{n:03d}", "StudyTime": f"0{n % 10}1{n % 7}33.5{n % 10}"}
    return values


SYNTAX_CYCLE = ("JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless", "JPEGBaseline8Bit",
                None)


@pytest.fixture(scope="module")
def pacs_export(tmp_path_factory):
    """CLASS/*.dcm as a PACS sends them: PA and AP, five transfer syntaxes and native, a CT slice, a burnt-in
    annotation, an odd modality and a multi-frame file; every text element holds a planted identifier."""
    root = tmp_path_factory.mktemp("pacs") / "export"
    raw_dir = root.parent / "raw"
    tokens: list[str] = []
    n = 0
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(32):
            n += 1
            values = planted(n)
            tokens += list(values.values())
            pixels = radiograph_like(300 + n, (200, 180), bright_patch=bool(label)).astype(np.uint16) * 16
            raw = write_dicom(raw_dir / f"{n}.dcm", pixels, "MONOCHROME2", Modality="DX",
                              ViewPosition="PA" if i % 2 else "AP", **values)
            syntax = SYNTAX_CYCLE[n % len(SYNTAX_CYCLE)]
            target = root / cls / f"img{n:03d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw.read_bytes()) if syntax is None else compress(raw, target, syntax)
    odd = {"ct.dcm": {"Modality": "CT"}, "burned.dcm": {"BurnedInAnnotation": "YES"},
           "oddmod.dcm": {"Modality": "PHIMODALITY"}}
    for name, extra in odd.items():
        n += 1
        values = planted(n)
        tokens += list(values.values()) + [v for v in extra.values() if v.startswith("PHI")]
        write_dicom(root / "NORMAL" / name, stored_12bit(n), "MONOCHROME2", **(values | extra))
    n += 1
    tokens += list(planted(n).values())
    frames = write_dicom(root / "NORMAL" / "multi.dcm", np.vstack([stored_12bit(1), stored_12bit(2)]),
                         "MONOCHROME2", **planted(n))
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames, ds.Rows = 2, 260
    ds.save_as(frames)
    return root, tokens


def assert_no_token(folder_or_text, tokens: list[str], where: str) -> None:
    blobs = ([(p, p.read_bytes()) for p in folder_or_text.rglob("*") if p.is_file()]
             if hasattr(folder_or_text, "rglob") else [(where, folder_or_text.encode())])
    assert blobs, where
    needles = [t.encode() for t in tokens] + [t.upper().encode() for t in tokens]
    for path, blob in blobs:
        found = [n.decode() for n in needles if n in blob]
        assert not found, f"{path} holds planted header values {found[:5]}"


def test_pacs_export_end_to_end_leaks_no_header_value(pacs_export, tmp_path, ray_session, capfd):
    import csv
    import json

    from distributed import evaluate, predict
    from distributed.model.zoo import build_model
    from preprocessing import schema
    from preprocessing.pipeline import PrepareConfig, prepare

    root, tokens = pacs_export
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(root), str(out), size=64, workers=2, val_fraction=0.25,
                                     test_fraction=0.35, seed=3))
    reasons = {r["input"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["NORMAL/ct.dcm"] == "modality CT is not in --modalities CR,DX"
    assert reasons["NORMAL/oddmod.dcm"] == "modality unrecognised is not in --modalities CR,DX"
    assert reasons["NORMAL/burned.dcm"].startswith("BurnedInAnnotation is YES")
    assert reasons["NORMAL/multi.dcm"] == "multi-frame DICOM (2 frames) is not supported"
    assert manifest["counts"]["written"] == 64 and manifest["transform"]["modalities"] == ["CR", "DX"]
    rows = list(csv.DictReader(open(out / schema.SPLIT_CSV)))
    assert {r["view"] for r in rows} == {"PA", "AP"}
    audit = json.loads((out / schema.AUDIT).read_text())["dicom"]
    assert audit["views"] == {"AP": 32, "PA": 32} and audit["modalities"] == {"DX": 64}
    assert audit["burned_in_annotation"] == {"absent": 64}
    assert set(audit["transfer_syntaxes"]) == {LOSSLESS[s] for s in LOSSLESS if s != "JPEGLosslessProcess14"} | {
        LOSSY["JPEGBaseline8Bit"], "1.2.840.10008.1.2.1"}
    assert sum(audit["views_per_split"]["test"].values()) == manifest["counts"]["per_split"]["test"]["total"]

    model_path = tmp_path / "untrained.keras"
    build_model("cnn", 64, 2, weights="none", seed=0).save(model_path)
    evaluated = tmp_path / "eval"
    assert evaluate.main(["--model", str(model_path), "--data", str(out), "--output", str(evaluated),
                          "--no-gradcam", "--bootstrap", "50", "--gallery", "1"]) == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    per_view = metrics["per_view"]
    assert set(per_view) == {"AP", "PA"}
    assert sum(v["n"] for v in per_view.values()) == metrics["n"]
    for view, entry in per_view.items():
        assert set(entry) >= {"accuracy", "sensitivity", "specificity", "roc_auc"}
        acc = entry["accuracy"]
        assert acc["low"] <= acc["value"] <= acc["high"], view
    assert "## Per view position" in (evaluated / "report.md").read_text()
    card = (evaluated / "model_card.md").read_text()
    assert "- View AP (" in card and "- View PA (" in card and "(site, sex, age, device)" in card
    assert ("DICOM files are accepted from CR, DX, every view and BodyPartExamined CHEST, UNKNOWN; burnt-in "
            "annotations are refused") in card

    predictions = tmp_path / "predictions.csv"
    # The dataset's rules hold at prediction too; files that fail them make the exit status 1.
    assert predict.main(["--model", str(model_path), "--manifest", str(out), "--output", str(predictions),
                         str(root)]) == 1
    predicted = list(csv.DictReader(open(predictions)))
    assert len(predicted) == 68 and sum(1 for r in predicted if r.get("error")) == 4
    assert any("modality CT is not in --modalities CR,DX" in r["error"] for r in predicted if r.get("error"))

    with pytest.raises(AssertionError, match="holds planted header values"):
        assert_no_token(root, tokens, "the export itself")  # the search finds what is there
    for folder in (out, evaluated):
        assert_no_token(folder, tokens, str(folder))
    assert_no_token(predictions.read_text(), tokens, "predictions.csv")
    captured = capfd.readouterr()
    assert_no_token(captured.out + captured.err, tokens, "the commands' output")
