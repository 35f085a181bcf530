"""A folder of real (or demo) videos: ``videos.csv`` + optional ``passes.csv``, validated.

``videos.csv``: ``video,camera,run,split`` (+ optional ``label`` for every pass of the video);
``video`` is a path relative to the folder, or an absolute path (``~`` is expanded), so
a folder can list videos that live elsewhere (e.g. a shared footage store). ``passes.csv`` (optional):
``run,pass_index,product_id,label,defect_type,split,defect_cameras`` (+ optional ``lane``: passes
are numbered per lane; empty = the default lane ``main``). See ARCHITECTURE.md.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from defectflow.errors import DefectflowError
from defectflow.manifest import LABELS, SPLITS

VIDEO_COLUMNS = ("video", "camera", "run", "split")
PASS_COLUMNS = ("run", "pass_index", "product_id", "label", "defect_type", "split", "defect_cameras")
DEFAULT_LANE = "main"        # the lane of frames.region: passes.csv rows without a lane, ids without a lane part


class VideoSourceError(DefectflowError):
    """A videos folder, its CSV files or a listed video is missing or invalid."""


class VideoReadError(DefectflowError):
    """A video file cannot be opened or is truncated."""


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as stripped strings (empty cells -> ""), checking its required columns."""
    if not path.is_file():
        raise VideoSourceError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise VideoSourceError(f"{path}: not a readable CSV file: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise VideoSourceError(f"{path}: missing column(s) {missing}; expected {list(required)}")
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    return df


def _check_values(df: pd.DataFrame, path: Path, col: str, allowed: tuple[str, ...], allow_empty=False) -> None:
    values = set(df[col])
    if allow_empty:
        values.discard("")
    bad = sorted(values - set(allowed))
    if bad:
        rows = [i + 2 for i in df.index[df[col].isin(bad)][:5]]
        raise VideoSourceError(f"{path}: column '{col}' has invalid value(s) {bad} (line(s) {rows}); "
                               f"allowed {list(allowed)}")


def _check_filled(df: pd.DataFrame, path: Path, cols) -> None:
    for col in cols:
        empty = df.index[df[col] == ""]
        if len(empty):
            raise VideoSourceError(f"{path}: column '{col}' is empty on line(s) {[i + 2 for i in empty[:5]]}")


def load_videos(folder: Path | str) -> pd.DataFrame:
    """Read ``folder/videos.csv``; return ``video,camera,run,split,label,path`` (one row per video).

    ``label`` is "" where not given; ``path`` is ``folder/video`` (posix; ``video`` itself when
    it is absolute). Raises VideoSourceError
    naming the file for a missing file or column, bad split/label values, duplicate videos or
    (run, camera) pairs, and listed videos that do not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoSourceError(f"{folder}: videos folder not found")
    path = folder / "videos.csv"
    df = _read_csv(path, VIDEO_COLUMNS)
    if df.empty:
        raise VideoSourceError(f"{path}: lists no videos")
    if "label" not in df.columns:
        df["label"] = ""
    _check_filled(df, path, VIDEO_COLUMNS)
    _check_values(df, path, "split", SPLITS)
    _check_values(df, path, "label", LABELS, allow_empty=True)
    for cols in (["video"], ["run", "camera"]):
        dup = df[df.duplicated(cols, keep=False)]
        if len(dup):
            raise VideoSourceError(f"{path}: duplicate {'/'.join(cols)}: {dup[cols].iloc[0].tolist()}")
    df["path"] = [(folder / Path(v).expanduser()).as_posix() for v in df["video"]]   # an absolute video wins
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise VideoSourceError(f"{path}: {len(missing)} listed video(s) not found, e.g. {missing[0]}")
    return df[[*VIDEO_COLUMNS, "label", "path"]].reset_index(drop=True)


def load_passes(folder: Path | str) -> pd.DataFrame | None:
    """Read ``folder/passes.csv`` if present (else None); ``pass_index`` as int, empty cells as "".

    ``lane`` is DEFAULT_LANE where the column or the cell is empty. Raises VideoSourceError naming
    the file for missing columns, bad values, duplicate (run, lane, pass_index) or product ids.
    """
    path = Path(folder) / "passes.csv"
    if not path.exists():
        return None
    df = _read_csv(path, PASS_COLUMNS)
    _check_filled(df, path, ("run", "pass_index", "product_id", "label", "split"))
    _check_values(df, path, "split", SPLITS)
    _check_values(df, path, "label", LABELS)
    idx = pd.to_numeric(df["pass_index"], errors="coerce")
    bad = df.index[idx.isna() | (idx < 0) | (idx != idx.round())]
    if len(bad):
        raise VideoSourceError(f"{path}: column 'pass_index' must be a whole number >= 0 "
                               f"(line(s) {[i + 2 for i in bad[:5]]})")
    df["pass_index"] = idx.astype("int64")
    df["lane"] = df["lane"].replace("", DEFAULT_LANE) if "lane" in df.columns else DEFAULT_LANE
    for cols in (["run", "lane", "pass_index"], ["product_id"]):
        dup = df[df.duplicated(cols, keep=False)]
        if len(dup):
            raise VideoSourceError(f"{path}: duplicate {'/'.join(cols)}: {dup[cols].iloc[0].tolist()}")
    return df[[*PASS_COLUMNS, "lane"]].reset_index(drop=True)


def defect_cameras(value: str) -> list[str]:
    """Split a ``defect_cameras`` cell (``;``-joined) into camera names."""
    return [c.strip() for c in str(value).split(";") if c.strip()]


def camera_label(pass_row, camera: str) -> tuple[str, str | None]:
    """(label, defect_type) of one camera's view of a product row of passes.csv.

    A defective product is ``defect`` only for cameras in its defect_cameras (all cameras when
    that cell is empty); the other cameras see a ``good`` product (defect_type None).
    """
    label = pass_row["label"]
    if label != "defect":
        return label, None
    cams = defect_cameras(pass_row["defect_cameras"])
    if cams and camera not in cams:
        return "good", None
    return "defect", pass_row["defect_type"] or None


class Products:
    """Product id, split and camera label of pass k of a lane of a run: from passes.csv, else from the video
    row: silently (``from_videos``) for a labelled row of a run passes.csv does not list (ingested videos)."""

    def __init__(self, passes: pd.DataFrame | None):
        self.rows = {} if passes is None else {(r["run"], r["lane"], int(r["pass_index"])): r
                                               for r in passes.to_dict("records")}
        self.runs = {run for run, _, _ in self.rows}
        self.has_table = passes is not None
        self.unlisted: list[str] = []
        self.from_videos: list[str] = []

    def info(self, video, lane: str, k: int) -> dict:
        row = self.rows.get((video.run, lane, k))
        if row is None:
            if self.has_table:
                if video.run not in self.runs and getattr(video, "label", ""):
                    self.from_videos.append(video.run)
                else:
                    self.unlisted.append(f"{video.run} {lane} pass {k}")
            pid = f"{video.run}-p{k:03d}" if lane == DEFAULT_LANE else f"{video.run}-{lane}-p{k:03d}"
            return {"product_id": pid, "split": video.split, "label": video.label or "unknown", "defect_type": None}
        label, defect_type = camera_label(row, video.camera)
        return {"product_id": row["product_id"], "split": row["split"], "label": label, "defect_type": defect_type}

    def expected(self, run: str, lane: str) -> int | None:
        """Passes passes.csv lists for the lane; None without a table or for a run it does not list."""
        if not self.has_table or run not in self.runs:
            return None
        return sum(r == run and ln == lane for r, ln, _ in self.rows)
