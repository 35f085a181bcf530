from pathlib import Path

import pytest

from defectflow.config import ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_with_expected_defaults():
    p = load_params(ROOT / "params.yaml")
    assert p.masks.shrink == pytest.approx(0.10)
    assert p.train.backbone == "efficientnet_lite0"
    assert p.threshold.method == "target_fpr" and p.threshold.target_fpr == 0.05
    assert p.gate.max_auroc_drop == 0.02 and p.gate.max_far_increase == 0.02
    assert p.registry.keep == 10 and p.nightly.lock == ".nightly.lock" and p.ingest.inbox == "data/inbox"
    assert p.scale.runner == "threads" and p.scale.unit_cache is True and p.scale.on_unit_error == "stop"
    assert p.synth.enabled is True and p.synth.use_in_training is False and p.synth.size == 64


def test_unknown_key_names_the_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  hiden: 512\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    assert "train.hiden" in str(err.value) and "unknown key" in str(err.value)
    assert str(f) in str(err.value)


def test_out_of_range_value_names_key_and_range(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("masks:\n  shrink: 1.5\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    msg = str(err.value)
    assert "masks.shrink" in msg and "0.9" in msg and "1.5" in msg


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"source": {"kind": "camera"}})
    assert "source.kind" in str(err.value) and "'images'" in str(err.value)


def test_region_must_be_ordered():
    with pytest.raises(ParamsError, match="region"):
        params_from_dict({"frames": {"region": [0.8, 0.0, 0.2, 1.0]}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(listy)


def test_image_size_auto_follows_the_data(tmp_path):
    import cv2
    import numpy as np
    from defectflow.config import params_from_dict
    from defectflow.image_io import auto_image_size

    assert params_from_dict({"train": {"image_size": "auto"}}).train.image_size == "auto"
    with pytest.raises(ParamsError, match="image_size"):
        params_from_dict({"train": {"image_size": 16}})
    paths = []
    for i, (h, w) in enumerate([(300, 500), (330, 400), (350, 360), (900, 900), (100, 700)]):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.zeros((h, w), np.uint8))
        paths.append(p)
    assert auto_image_size(paths) == 320                  # median short side 330 -> 320
    assert auto_image_size(paths[3:4]) == 448             # capped
    assert auto_image_size(paths[4:]) == 224              # floored
