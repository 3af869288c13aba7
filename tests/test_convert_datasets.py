"""dgss-convert (dgss/convert.py): raw releases in their real layouts and id spaces -> trainId PNGs that RealDataset
reads as the spec's tables say; reruns are no-ops, interrupted runs resume, nothing half-written under a real name."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgss import convert as cd
from dgss.data.label_maps import (
    CITYSCAPES_ID_TO_TRAIN,
    MAPILLARY_V12_TO_TRAIN,
    SYNTHIA_ID_TO_TRAIN,
    lookup_table,
)
from dgss.data.real import RealDataset

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
        assert np.array_equal(ds.load(i)[1].numpy(), table[raw[n]])
    assert (table[raw["00001"]] == 255).any() and (table[raw["00001"]] < 19).any()

    city = _ids(34)
    stem = "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine"
    Image.fromarray(city.astype(np.uint8)).save(_mk(tmp_path / f"{stem}_labelIds.png"))
    _rgb(tmp_path / "cityscapes/leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    cd.convert("cityscapes", tmp_path, progress=False)
    train_ids = RealDataset("cityscapes", "val", tmp_path).load(0)[1].numpy()
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
    label = RealDataset("synthia", "all", tmp_path).load(0)[1].numpy()
    assert np.array_equal(label, lookup_table(SYNTHIA_ID_TO_TRAIN, 65536)[ids])
    assert set(np.unique(label)) <= set(range(19)) | {255}


def test_urbansyn_labels_keep_train_ids_and_unlabelled_becomes_ignore(tmp_path):
    """SoMA's tools/convert_datasets/urbansyn.py: ss/ holds trainIds with 19 = unlabelled, set to 255 (here into
    urbansyn/labels/, the release untouched); the released ss_<k> name beside rgb_<k> and the image's own name both
    pair; an image without a label is one line."""
    ids = RNG.integers(0, 20, (H, W)).astype(np.uint8)  # 0..19
    for name, label in (("rgb_0001.png", "ss_0001.png"), ("b.png", "b.png")):
        (tmp_path / "urbansyn/ss").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(tmp_path / "urbansyn/ss" / label)
        _rgb(tmp_path / "urbansyn/rgb" / name)
    before = (tmp_path / "urbansyn/ss/ss_0001.png").read_bytes()
    cd.convert("urbansyn", tmp_path, progress=False)
    ds = RealDataset("urbansyn", "all", tmp_path)
    assert len(ds) == 2 and (tmp_path / "urbansyn/labels/rgb_0001_labelTrainIds.png").is_file()
    want = np.where(ids == 19, 255, ids)
    for i in range(2):
        assert np.array_equal(ds.load(i)[1].numpy(), want)
    assert (tmp_path / "urbansyn/ss/ss_0001.png").read_bytes() == before  # the release is not rewritten
    rows = cd.check(tmp_path)
    assert [(r["dataset"], r["images"], "error" in r) for r in rows] == [("urbansyn", 2, False)]
    _rgb(tmp_path / "urbansyn/rgb/rgb_0002.png")
    with pytest.raises(
        cd.ConvertError, match=r"1 UrbanSyn images have no label .* rgb_0002.png or ss_0002.png"
    ):
        cd.convert("urbansyn", tmp_path, progress=False)


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
    assert np.array_equal(RealDataset("mapillary", "train", tmp_path).load(0)[1].numpy(), table[train])
    image, label = RealDataset("mapillary", "val", tmp_path).load(0)
    assert image.shape == (3, H // 2, W // 2)
    assert np.array_equal(label.numpy(), table[val][1::2, 1::2])  # nearest: no invented class values

    (tmp_path / "mapillary/config_v1.2.json").write_text(json.dumps({"labels": [{}] * 124}))
    with pytest.raises(cd.ConvertError, match="lists 124 labels, v1.2 has 66: not a v1.2 config"):
        cd.convert("mapillary", tmp_path, progress=False)


def _raw_release(dataset: str, root: Path, n: int = 3) -> None:
    """``n`` samples of a release in its raw layout and id space (deterministic per name)."""
    rng = np.random.default_rng(1)
    for k in range(n):
        if dataset == "gta":
            _palettised(root / f"gta/labels/{k:05d}.png", rng.integers(0, 40, (H, W)))
        elif dataset == "synthia":
            ids = rng.integers(0, 23, (H, W))
            _png16_rgb(root / f"synthia/GT/LABELS/{k:07d}.png", np.stack([ids, ids * 7, ids * 3]))
        elif dataset == "cityscapes":
            lab = root / f"cityscapes/gtFine/train/aachen/aachen_{k:06d}_000019_gtFine_labelIds.png"
            Image.fromarray(rng.integers(0, 34, (H, W)).astype(np.uint8)).save(_mk(lab))
        elif dataset == "urbansyn":
            Image.fromarray(rng.integers(0, 20, (H, W)).astype(np.uint8)).save(
                _mk(root / f"urbansyn/ss/ss_{k:04d}.png")
            )
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
                _mk(root / f"urbansyn/rgb/rgb_{k:04d}.png")
            )
        else:
            for split in ("training", "validation"):
                _palettised(root / f"mapillary/{split}/v1.2/labels/m{k}.png", rng.integers(0, 66, (H, W)))
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
                _mk(root / f"mapillary/validation/images/m{k}.jpg")
            )


def _outputs(root: Path) -> dict[str, np.ndarray]:
    made = [
        p
        for p in root.rglob("*")
        if p.is_file() and ("TrainIds" in p.name or "trainId" in str(p) or "half" in str(p))
    ]
    return {str(p.relative_to(root)): _read(p) for p in made}


@pytest.mark.parametrize("dataset", list(cd.PLANS))
def test_interrupted_conversion_resumes_and_reruns_are_noops(tmp_path, monkeypatch, dataset):
    reference, root = tmp_path / "reference", tmp_path / "interrupted"
    for r in (reference, root):
        _raw_release(dataset, r)
    cd.convert(dataset, reference, progress=False)
    want = _outputs(reference)
    total = sum(len(step) for _, step in cd.PLANS[dataset](reference))
    assert len(want) == total >= 3

    run_task, calls = cd.run_task, []

    def interrupted(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task)
        return run_task(task)

    monkeypatch.setattr(cd, "run_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cd.convert(dataset, root, progress=False)
    assert set(_outputs(root)) == {str(t.dst.relative_to(root)) for t in calls}  # only finished files exist
    leftover = calls[0].dst.with_name(f".{calls[-1].dst.name}.999.tmp")
    leftover.write_bytes(b"\x89PNG half")  # what a killed worker leaves behind
    monkeypatch.setattr(cd, "run_task", run_task)
    mtimes = {t.dst: t.dst.stat().st_mtime_ns for t in calls}

    counts = cd.convert(dataset, root, progress=False)
    assert counts == {"converted": total - 2, "up_to_date": 2, "stale_temporaries_removed": 1}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished files untouched
    assert not leftover.exists()
    got = _outputs(root)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert cd.convert(dataset, root, progress=False)["converted"] == 0
    # issue 25 (9): a source replaced by a file with an older mtime (what unzip and tar restore) was never
    # converted again; now its output is
    first = next(t for _, step in cd.PLANS[dataset](root) for t in step)
    old = first.src.stat()
    first.src.write_bytes(first.src.read_bytes())
    os.utime(first.src, ns=(old.st_atime_ns, old.st_mtime_ns - 10**9))
    assert cd.convert(dataset, root, progress=False)["converted"] >= 1


def test_missing_release_is_one_line(tmp_path, capsys):
    assert cd.main(["synthia", "--root", str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "synthia/GT/LABELS does not exist: unpack RAND_CITYSCAPES" in err


def test_check_names_a_missing_or_empty_root_and_every_bad_pair(tmp_path, capsys):
    assert cd.main(["check", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: data root {tmp_path / 'nowhere'} does not exist; set DGSS_DATA_ROOT or --root (layouts: README, Real data)"
    )
    assert cd.main(["check", "--root", str(tmp_path)]) == 2
    assert "holds none of the data sets: expected one of acdc/, bdd100k/" in capsys.readouterr().err
    (tmp_path / "gta/labels").mkdir(parents=True)
    for n in range(4):
        _rgb(tmp_path / f"gta/images/{n}.png")
        Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / f"gta/labels/{n}_labelTrainIds.png")
    (tmp_path / "gta/labels/1_labelTrainIds.png").write_bytes(b"broken")
    Image.fromarray(np.full((H, W), 40, np.uint8)).save(tmp_path / "gta/labels/3_labelTrainIds.png")
    assert cd.main(["check", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    row = json.loads(out.strip().splitlines()[0])
    assert (
        row["images"] == 4 and row["error"] == "2 bad pairs" and len(row["bad"]) == 2
    )  # both, not the first
    assert "1_labelTrainIds.png" in row["bad"][0] and "3_labelTrainIds.png" in row["bad"][1]
    assert err.strip() == "error: 1 of 1 splits have problems: gta all: 2 bad pairs"
