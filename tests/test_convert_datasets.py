"""scripts/convert_datasets.py: raw releases in their real layouts and id spaces -> trainId PNGs that RealDataset
reads as the spec's tables say; reruns are no-ops, interrupted runs resume, nothing half-written under a real name."""

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgss.data.label_maps import (
    CITYSCAPES_ID_TO_TRAIN,
    MAPILLARY_V12_TO_TRAIN,
    SYNTHIA_ID_TO_TRAIN,
    lookup_table,
)
from dgss.data.real import RealDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import convert_datasets as cd  # noqa: E402

H, W = 8, 12
RNG = np.random.default_rng(0)


def _ids(high: int) -> np.ndarray:
    return RNG.integers(0, high, (H, W))


def _rgb(path: Path, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _palettised(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="L").convert("P")
    im.putpalette(RNG.integers(0, 255, 768, dtype=np.uint8).tolist())  # colours unrelated to the ids
    im.save(path)


def _png16_rgb(path: Path, channels: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): signature, IHDR, one zlib IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = channels.shape[1:]
    rows = b"".join(b"\x00" + channels[:, y].T.astype(">u2").tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip


def _read(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def test_gta_and_cityscapes_labelids_round_trip(tmp_path):
    raw = {}
    for n in ("00001", "00002", "00003"):
        raw[n] = _ids(40)
        _rgb(tmp_path / f"gta/images/{n}.png")
        _palettised(tmp_path / f"gta/labels/{n}.png", raw[n])
    assert cd.convert("gta", tmp_path, workers=2, progress=False)["converted"] == 3
    table = lookup_table(CITYSCAPES_ID_TO_TRAIN)
    ds = RealDataset("gta", "all", tmp_path)
    for i, n in enumerate(sorted(raw)):
        assert np.array_equal(ds[i]["label"].numpy(), table[raw[n]])
    assert (table[raw["00001"]] == 255).any() and (table[raw["00001"]] < 19).any()

    city = _ids(34)
    stem = "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine"
    Image.fromarray(city.astype(np.uint8)).save(_mk(tmp_path / f"{stem}_labelIds.png"))
    _rgb(tmp_path / "cityscapes/leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    cd.convert("cityscapes", tmp_path, progress=False)
    train_ids = RealDataset("cityscapes", "val", tmp_path)[0]["label"].numpy()
    assert np.array_equal(train_ids, table[city])
    back = {v: k for k, v in CITYSCAPES_ID_TO_TRAIN.items()}  # trainId -> labelId (server export)
    kept = train_ids != 255
    assert np.array_equal(np.vectorize(back.get)(train_ids[kept]), city[kept])


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_synthia_reads_the_first_channel_of_its_16bit_labels(tmp_path):
    ids = _ids(23)
    channels = np.stack(
        [ids, RNG.integers(0, 65535, (H, W)), np.full((H, W), 300)]
    )  # 2nd/3rd channel: instance data
    _png16_rgb(tmp_path / "synthia/GT/LABELS/0000001.png", channels)
    _rgb(tmp_path / "synthia/RGB/0000001.png")
    cd.convert("synthia", tmp_path, progress=False)
    label = RealDataset("synthia", "all", tmp_path)[0]["label"].numpy()
    assert np.array_equal(label, lookup_table(SYNTHIA_ID_TO_TRAIN, 65536)[ids])
    assert set(np.unique(label)) <= set(range(19)) | {255}


def test_mapillary_v12_and_half_resolution_validation(tmp_path):
    (tmp_path / "mapillary").mkdir()
    (tmp_path / "mapillary/config_v1.2.json").write_text(
        json.dumps({"labels": [{"name": str(i)} for i in range(66)]})
    )
    train, val = _ids(66), _ids(66)
    _palettised(tmp_path / "mapillary/training/v1.2/labels/a.png", train)
    _rgb(tmp_path / "mapillary/training/images/a.jpg")
    _palettised(tmp_path / "mapillary/validation/v1.2/labels/b.png", val)
    _rgb(tmp_path / "mapillary/validation/images/b.jpg")
    counts = cd.convert("mapillary", tmp_path, progress=False)
    assert counts["converted"] == 4  # train label, val label, half image, half label
    table = lookup_table(MAPILLARY_V12_TO_TRAIN)
    assert np.array_equal(RealDataset("mapillary", "train", tmp_path)[0]["label"].numpy(), table[train])
    half = RealDataset("mapillary", "val", tmp_path)[0]
    assert half["image"].shape == (3, H // 2, W // 2)
    assert np.array_equal(half["label"].numpy(), table[val][1::2, 1::2])  # nearest: no invented class values

    (tmp_path / "mapillary/config_v1.2.json").write_text(json.dumps({"labels": [{}] * 124}))
    with pytest.raises(cd.ConvertError, match="lists 124 labels, v1.2 has 66: not a v1.2 config"):
        cd.convert("mapillary", tmp_path, progress=False)


def test_interrupted_conversion_resumes_and_reruns_are_noops(tmp_path, monkeypatch, capsys):
    for root in (tmp_path / "a", tmp_path / "b"):
        for n in range(5):
            label = (
                RNG.integers(0, 34, (H, W)) if root.name == "a" else _read(tmp_path / f"a/gta/labels/{n}.png")
            )
            _palettised(root / f"gta/labels/{n}.png", label)
    reference = tmp_path / "b"
    cd.convert("gta", reference, progress=False)

    work, calls = cd.WORK["cityscapes_ids"], []

    def interrupted(src, dst):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(src)
        work(src, dst)

    monkeypatch.setitem(cd.WORK, "cityscapes_ids", interrupted)
    root = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        cd.convert("gta", root, progress=False)
    done = sorted(p.name for p in (root / "gta/labels").glob("*_labelTrainIds.png"))
    assert done == ["0_labelTrainIds.png", "1_labelTrainIds.png"]
    (root / "gta/labels/.2_labelTrainIds.png.999.tmp").write_bytes(
        b"\x89PNG half"
    )  # a killed worker's leftover
    monkeypatch.setitem(cd.WORK, "cityscapes_ids", work)
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "gta/labels").glob("*_labelTrainIds.png")}

    counts = cd.convert("gta", root, progress=False)
    assert counts == {"converted": 3, "up_to_date": 2, "stale_temporaries_removed": 1}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished files untouched
    assert not list((root / "gta/labels").glob(".*"))
    for n in range(5):
        name = f"gta/labels/{n}_labelTrainIds.png"
        assert np.array_equal(_read(root / name), _read(reference / name))
    assert cd.convert("gta", root, progress=False)["converted"] == 0

    assert cd.main(["synthia", "--root", str(root), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line naming the folder and what to unpack
