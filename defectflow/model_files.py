"""What a model folder holds: file names, the score columns of the heads, and its errors."""
from __future__ import annotations

from pathlib import Path

from defectflow.errors import DefectflowError

MODEL_FILE = "model.pt"
HEAD_FILE = "density.onnx"
VAL_SPLIT_FILE = "val_split.json"
CONV_FILE = "conv.pt"
CONV_HEAD_FILE = "conv.onnx"
FUSION_FILE = "fusion.json"
MEMORY_FILE = "memory.npy"             # the conv head's patch memory (density/memory.py)
MODEL_FORMAT = 1
HEADS = {"image": "score_image", "conv": "score_conv"}   # head -> the SCORES column with its score


class ModelError(DefectflowError):
    """A model folder is missing, unreadable or does not match the current backbone weights."""


def head_session(file: Path, threads: int, what: str):
    """ONNX Runtime session of a head's graph (no blocked layout: small convolutions); errors name the file."""
    from defectflow.onnx_backbone import ort_session

    try:
        return ort_session(file, threads, blocked_layout=False)
    except Exception as err:
        raise ModelError(f"{file}: unreadable ONNX {what} ({err}); retrain or delete it") from None
