"""Chunks of a videos source for streaming: whole runs (all cameras of a product together)."""
from __future__ import annotations

from pathlib import Path

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
