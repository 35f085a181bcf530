import pytest


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A fresh ONNX-export / feature cache per test module (no sharing with the workspace's)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEFECTFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
