import pandas as pd
import pyarrow.parquet as pq
import pytest

from defectflow.fsutil import atomic_dir
from defectflow.manifest import FRAMES, ITEMS, ManifestError, read_manifest, read_meta, write_manifest


def items(n=3, **over):
    rows = [dict(item_id=f"i{k}", product_id=f"p{k}", run="r0", camera="cam0", split="train",
                 label="good", image_path=f"x/{k}.png", source="demo") for k in range(n)]
    df = pd.DataFrame(rows)
    for key, value in over.items():
        df[key] = value
    return df


def test_round_trip_adds_optional_columns_and_meta(tmp_path):
    path = write_manifest(items(), ITEMS, tmp_path / "m.parquet", meta={"skipped": "because"})
    back = read_manifest(path, ITEMS)
    assert list(back.columns) == ITEMS.names
    assert back["defect_type"].isna().all()
    assert read_meta(path)["skipped"] == "because"
    assert read_meta(path)["schema"] == "items"


def test_missing_required_column_is_named(tmp_path):
    with pytest.raises(ManifestError, match="required column 'split'"):
        write_manifest(items().drop(columns="split"), ITEMS, tmp_path / "m.parquet")


def test_null_in_required_column(tmp_path):
    df = items()
    df.loc[1, "image_path"] = None
    with pytest.raises(ManifestError, match="'image_path' is required but has 1 empty"):
        write_manifest(df, ITEMS, tmp_path / "m.parquet")


def test_wrong_type_and_unknown_column(tmp_path):
    df = items(is_center=["yes", "no", "maybe"])
    with pytest.raises(ManifestError, match="is_center"):
        write_manifest(df, FRAMES, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="not in the 'items' schema"):
        write_manifest(items(bogus=1), ITEMS, tmp_path / "m.parquet")


def test_bad_split_label_and_duplicate_ids(tmp_path):
    with pytest.raises(ManifestError, match="'split' has values \\['training'\\]"):
        write_manifest(items(split="training"), ITEMS, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="'label'"):
        write_manifest(items(label="bad"), ITEMS, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="duplicate"):
        write_manifest(items(item_id="same"), ITEMS, tmp_path / "m.parquet")


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_manifest(items(2), ITEMS, tmp_path / "m.parquet")
    with pytest.raises(ManifestError):
        write_manifest(items(5, split="nope"), ITEMS, path)
    assert len(read_manifest(path, ITEMS)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temp file left


def test_read_checks_schema_and_names_file(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(items(), ITEMS, path)
    with pytest.raises(ManifestError, match="required column 'is_center'"):
        read_manifest(path, FRAMES)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="junk.parquet: not a readable Parquet"):
        read_manifest(junk, ITEMS)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.parquet", ITEMS)
    # a file written by another tool with a wrong type is refused on read
    pq.write_table(pq.read_table(path).drop(["run"]), tmp_path / "norun.parquet")
    with pytest.raises(ManifestError, match="'run'"):
        read_manifest(tmp_path / "norun.parquet", ITEMS)


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights.txt").write_text("half")
            raise RuntimeError("crash mid-training")
    assert (out / "weights.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
