"""Chunks for streaming the score flow: whole runs of a videos source (all cameras of a product together),
row ranges of an images source, and parts of the rows to score."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from defectflow.sources.videos import load_videos


def run_chunks(source: Path | str, per_chunk: int) -> list[list[str]]:
    """The source's runs in videos.csv order, grouped so each chunk holds about ``per_chunk`` videos.

    A run is never split (a product's verdict needs every camera); a run with more videos than
    ``per_chunk`` is a chunk of its own.
    """
    videos = load_videos(source)
    sizes = videos.groupby("run", sort=False).size()
    chunks, current, n = [], [], 0
    for run, count in sizes.items():
        if current and n + count > per_chunk:
            chunks.append(current)
            current, n = [], 0
        current.append(str(run))
        n += int(count)
    if current:
        chunks.append(current)
    return chunks


def image_chunks(n_images: int, per_chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of an images source of ``n_images`` rows, ``per_chunk`` rows each."""
    if per_chunk < 1:
        raise ValueError(f"per_chunk must be >= 1, got {per_chunk}")
    return [(a, min(a + per_chunk, n_images)) for a in range(0, n_images, per_chunk)]


def row_parts(df: pd.DataFrame, per_part: int) -> list[pd.DataFrame]:
    """``df`` cut into consecutive parts of ``per_part`` rows (index kept), e.g. the views a score task takes."""
    if per_part < 1:
        raise ValueError(f"per_part must be >= 1, got {per_part}")
    return [df.iloc[a:a + per_part] for a in range(0, len(df), per_part)]
