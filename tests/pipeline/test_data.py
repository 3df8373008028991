from __future__ import annotations

import numpy as np
import pytest

from keras_lean.pipeline import build_model, check_data_against_model, load_data


def test_digits():
    d = load_data("digits")
    assert d.x_train.shape[1:] == (8, 8, 1) and d.x_train.dtype == np.float32
    assert d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_npz_with_split_and_with_x_y(tmp_path, digits):
    x_train, y_train, x_val, y_val = digits
    p = tmp_path / "split.npz"
    np.savez(p, x_train=x_train[:50], y_train=y_train[:50], x_val=x_val[:20], y_val=y_val[:20])
    d = load_data(p)
    assert d.x_train.shape == (50, 8, 8, 1) and d.x_val.shape == (20, 8, 8, 1)
    p2 = tmp_path / "xy.npz"
    np.savez(p2, x=x_train[:100], y=y_train[:100].astype("float64"))
    d2 = load_data(p2, val_split=0.25)
    assert len(d2.x_val) == 25 and len(d2.x_train) == 75 and d2.y_train.dtype == np.int32


def test_one_hot_labels_are_accepted(tmp_path, digits):
    x, y = digits[0][:30], digits[1][:30]
    p = tmp_path / "onehot.npz"
    np.savez(p, x=x, y=np.eye(10)[y])
    d = load_data(p, val_split=0.2)
    assert set(d.y_train) | set(d.y_val) <= set(range(10))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            arr = rng.integers(0, 255, (6, 7), dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(tmp_path / cls / f"{i}.png")
    d = load_data(tmp_path, val_split=0.2)
    assert d.x_train.shape[1:] == (6, 7, 1) and d.num_classes == 2
    assert len(d.x_train) == 8 and len(d.x_val) == 2
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(tmp_path / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"image size \(5, 5\) differs"):
        load_data(tmp_path)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"a": np.zeros(3)}, r"expected arrays x_train, y_train, x_val, y_val \(or x, y\)"),
        ({"x": np.full((10, 4), np.nan), "y": np.zeros(10)}, r"x_train contains \d+ NaN"),
        ({"x": np.zeros((10, 4)), "y": -np.ones(10)}, r"labels out of range: .* label -1"),
        ({"x": np.zeros((10, 4)), "y": np.full(10, 0.5)}, "non-integer labels"),
        ({"x": np.zeros((10, 4)), "y": np.zeros(9)}, "x has 10 samples but y has 9"),
    ],
    ids=["missing-arrays", "nan", "negative-label", "fractional-label", "length-mismatch"],
)
def test_bad_npz(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match):
        load_data(p, val_split=0.2)


def test_corrupt_missing_and_unsupported(tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        load_data(bad)
    with pytest.raises(FileNotFoundError, match="Data not found"):
        load_data(tmp_path / "missing.npz")
    csv = tmp_path / "data.csv"
    csv.write_text("1,2\n")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_data(csv)
    with pytest.raises(ValueError, match=r"val_split must be in \(0, 1\)"):
        load_data("digits", val_split=1.0)


def test_shape_and_label_checks_against_the_model():
    d = load_data("digits")
    wrong_input = build_model("mlp", (28, 28, 1), 10)
    with pytest.raises(
        ValueError, match=r"Data shape \(8, 8, 1\).*input shape \(None, 28, 28, 1\)"
    ):
        check_data_against_model(d, wrong_input, model_name="m.keras")
    too_few_outputs = build_model("mlp", (8, 8, 1), 5)
    with pytest.raises(ValueError, match=r"Labels out of range: .* label 9 but m.keras has 5"):
        check_data_against_model(d, too_few_outputs, model_name="m.keras")
    check_data_against_model(d, build_model("cnn", (8, 8, 1), 10))
