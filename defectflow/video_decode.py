"""Reading videos for the frames stage: a plain decode loop, and the MJPG passthrough.

MJPG videos (the demo's, most USB / industrial cameras) take a fast path when
``frames.jpeg_passthrough`` is on: the container's JPEG packets are read as they are, motion runs
on a reduced-size greyscale JPEG decode (DCT scaling: a fraction of a full decode) of the frames
that are tracked, and kept frames are written as the video's own JPEG bytes (``.jpg``, no
re-encode). Other codecs are decoded fully (kept frames are written as PNG).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import cv2
import numpy as np

JPEG_FOURCCS = {"MJPG", "mjpg", "MJPEG", "AVRn", "LJPG", "JPEG", "jpeg", "dmb1"}
REDUCED_GREY = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}

Payload = Union[np.ndarray, bytes]   # a decoded BGR frame, or the frame's JPEG bytes (passthrough)


@dataclass
class VideoScan:
    """What reading one video gave."""

    path: str
    fps: float
    expected: int          # frame count from the container (0: unknown)
    n_read: int = 0
    n_passes: int = 0
    n_dropped: int = 0     # tracks that were not counted (never crossed a line, too short or too static)
    n_tracks: int = 0
    jpeg: bool = False     # read through the MJPG passthrough
    bad_frame: int | None = None   # first frame whose JPEG packet did not decode (passthrough)
    problem: str | None = None

    def finish(self) -> None:
        """Set ``problem`` for an empty, truncated or partly undecodable stream (if no decode error did)."""
        if self.problem is None:
            if self.n_read == 0:
                self.problem = "no frame could be decoded"
            elif self.expected and self.n_read < self.expected - max(1, self.expected // 100):
                self.problem = f"truncated: decoded {self.n_read} of {self.expected} frames"
            elif self.bad_frame is not None:
                self.problem = f"frame {self.bad_frame} does not decode (corrupt JPEG packet)"
            if self.problem and self.bad_frame is not None and "does not decode" not in self.problem:
                self.problem += f" (frame {self.bad_frame} does not decode)"


def fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
    return "".join(chr((code >> 8 * i) & 0xFF) for i in range(4)).strip("\x00 ")


def nbytes(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, np.ndarray) else len(payload)


def decoded_frames(cap: cv2.VideoCapture, scan: VideoScan) -> Iterator[tuple[int, np.ndarray]]:
    """Frames of ``cap`` in order; a decoder error ends the stream and is recorded in ``scan``."""
    while True:
        try:
            ok, frame = cap.read()
        except cv2.error as err:
            scan.problem = f"decode error after frame {scan.n_read}: {str(err).strip()}"
            return
        if not ok or frame is None:
            return
        yield scan.n_read, frame
        scan.n_read += 1


class JpegStream:
    """MJPG passthrough: a capture in raw-packet mode; each packet is one JPEG frame."""

    def __init__(self, cap: cv2.VideoCapture, shape: tuple[int, int]):
        self.cap, self.shape = cap, shape
        self.reduce, self.flag = 1, REDUCED_GREY[1]

    @staticmethod
    def open(path: Path | str) -> "JpegStream | None":
        """The passthrough for ``path``, or None (not MJPG, raw mode unsupported, packets not plain JPEG)."""
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened() or fourcc(cap) not in JPEG_FOURCCS or not cap.set(cv2.CAP_PROP_FORMAT, -1):
                cap.release()
                return None
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            ok, pkt = cap.read()
            full = cv2.imdecode(pkt, cv2.IMREAD_COLOR) if ok and pkt is not None and pkt.size else None
        except cv2.error:
            cap.release()
            return None
        if full is None or full.shape[:2] != (h, w):
            cap.release()
            return None
        cap.release()                                    # re-open: the probe consumed the first packet
        cap = cv2.VideoCapture(str(path))
        cap.set(cv2.CAP_PROP_FORMAT, -1)
        return JpegStream(cap, (h, w))

    def set_reduce(self, region_width: float, work_width: int) -> None:
        """Decode motion frames at the largest DCT scale that keeps ``region_width`` >= ``work_width``."""
        self.reduce = max([k for k in (1, 2, 4, 8) if region_width / k >= work_width] or [1])
        self.flag = REDUCED_GREY[self.reduce]

    def packets(self, scan: VideoScan) -> Iterator[tuple[int, np.ndarray]]:
        """(index, JPEG packet) per frame."""
        while True:
            try:
                ok, pkt = self.cap.read()
            except cv2.error as err:
                scan.problem = f"decode error after frame {scan.n_read}: {str(err).strip()}"
                return
            if not ok or pkt is None or not pkt.size:
                return
            yield scan.n_read, pkt
            scan.n_read += 1

    def grey(self, pkt: np.ndarray) -> np.ndarray | None:
        """Reduced greyscale decode of a packet (None: corrupt)."""
        return cv2.imdecode(pkt, self.flag)
