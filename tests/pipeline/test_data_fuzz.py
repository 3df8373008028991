"""Random `.npz` contents thrown at the data loader and at `check_data_against_model`.

Every case ends either in a checked `Data` or in the loader's own `DataError` (a ValueError) that
names the file and the array at fault: never another exception. Wrong dtypes (strings, bytes,
complex, datetimes, records, objects), ranks 0 to 3, NaNs and infinities, values beyond float32,
zero samples, missing keys, and files that are not `.npz` archives at all.
"""

from __future__ import annotations

import io
import itertools
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_lean.pipeline.data import (
    NPZ_SPLIT_KEYS,
    DataError,
    check_data_against_model,
    load_data,
)

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = (*NPZ_SPLIT_KEYS, "x", "y", "extra")
_names = itertools.count()

DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "str": "U3",
    "bytes": "S3",
    "datetime": "datetime64[s]",
    "record": [("a", "i4"), ("b", "f4")],
    "object": object,
}
VALUES = st.one_of(
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.5, 1e39, -1e39, 2.0**40]),
)


@st.composite
def arrays(draw) -> np.ndarray:
    """An array of any dtype and of rank 0 to 3 (axes of 0 to 5 entries)."""
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    size = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(VALUES, min_size=size, max_size=size))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    if dtype is object:
        out = np.empty(size, dtype=object)
        out[:] = [draw(st.sampled_from([v, str(v), None, [v]])) for v in values]
        return out.reshape(shape)
    with np.errstate(all="ignore"):
        try:
            return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)
        except (TypeError, ValueError):  # records and datetimes do not take every float
            return np.zeros(shape, dtype=dtype)


@st.composite
def plausible(draw) -> dict[str, np.ndarray]:
    """Nearly right contents: float images and integer labels, with one thing wrong (or none)."""
    n_train, n_val = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    width = draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    contents = {
        "x_train": rng.normal(size=(n_train, width)).astype("float32"),
        "y_train": rng.integers(0, 3, n_train),
        "x_val": rng.normal(size=(n_val, width)).astype("float32"),
        "y_val": rng.integers(0, 3, n_val),
    }
    key = draw(st.sampled_from([None, *NPZ_SPLIT_KEYS]))
    if key is not None:
        contents[key] = draw(arrays())
    return contents


CONTENTS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), arrays(), max_size=5),
    plausible(),
)


def _write(folder, contents: dict[str, np.ndarray], corruption: str):
    path = folder / f"data_{next(_names)}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **contents)  # pickles object arrays, as a careless writer would
    data = buffer.getvalue()
    if corruption == "truncated":
        data = data[: max(1, len(data) // 2)]
    elif corruption == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3))
        data = buffer.getvalue()
    elif corruption == "text":
        data = b"x_train,y_train\n1,2\n"
    elif corruption == "bad_member":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("x_train.npy", b"\x93NUMPY garbage")
        data = buffer.getvalue()
    path.write_bytes(data)
    return path


def _check_loaded(data, path) -> None:
    for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.ndim >= 2 and len(x) == len(y) > 0
        assert min(x.shape[1:]) > 0  # every sample has features
        assert np.isfinite(x).all()
        assert y.min() >= 0 and y.max() < data.num_classes
    assert data.x_train.shape[1:] == data.x_val.shape[1:]
    assert data.num_classes >= 2


def _check_error(error: DataError, path) -> None:
    message = str(error)
    assert str(path) in message, message  # names the file
    if error.array is not None:
        assert error.array in message, message  # and the array
    assert "\n" not in message


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(
    contents=CONTENTS,
    corruption=st.sampled_from(["none"] * 6 + ["truncated", "npy", "text", "bad_member"]),
    val_split=st.sampled_from([0.2, 0.5, 0.9]),
)
def test_npz_loader_ends_in_data_or_its_own_error(folder, contents, corruption, val_split):
    path = _write(folder, contents, corruption)
    try:
        data = load_data(path, val_split=val_split)
    except DataError as e:
        _check_error(e, path)
        return
    _check_loaded(data, path)


class _Shapes:
    """A stand-in with the two attributes `check_data_against_model` reads from a model."""

    def __init__(self, input_shape, output_shape):
        self._input_shape, self.output_shape = input_shape, output_shape

    @property
    def input_shape(self):
        if self._input_shape == "unbuilt":
            raise AttributeError("The layer has never been called and thus has no defined input.")
        return self._input_shape


DIMS = st.one_of(st.none(), st.integers(1, 6))
SHAPE = st.lists(DIMS, max_size=3).map(lambda dims: (None, *dims))
MODEL_SHAPES = st.one_of(
    SHAPE,
    st.lists(SHAPE, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), SHAPE, max_size=2),
    st.just(()),
)


@FUZZ
@given(
    contents=plausible(),
    input_shape=st.one_of(MODEL_SHAPES, st.just("unbuilt")),
    output_shape=MODEL_SHAPES,
)
def test_check_data_against_model_ends_in_none_or_its_own_error(
    folder, contents, input_shape, output_shape
):
    path = _write(folder, contents, "none")
    try:
        data = load_data(path)
    except DataError:
        return  # the loader's own cases are the test above
    try:
        check_data_against_model(data, _Shapes(input_shape, output_shape), model_name="m.keras")
    except DataError as e:
        assert "m.keras" in str(e), str(e)
        assert "\n" not in str(e)


@pytest.mark.parametrize(
    "contents, array, match",
    [
        ({"x": np.zeros(()), "y": np.zeros(3)}, "x", r"x must have a sample axis"),
        ({"x": np.zeros((0, 4)), "y": np.zeros(0)}, "x", r"x has no samples"),
        ({"x": np.zeros((5, 0)), "y": np.arange(5) % 2}, "x_train", r"samples have no features"),
        ({"x": np.zeros((6, 2)), "y": np.zeros(6)}, "y_train", r"one class only"),
        (
            {"x": np.zeros((6, 2)), "y": np.full(6, 1e20)},
            "y_train",
            r"y_train has label 1e\+20; class labels must be below 2147483647",
        ),
        (
            {"x": np.full((6, 2), 1e39), "y": np.arange(6) % 2},
            "x_train",
            r"x_train contains 10 NaN/infinite values \(first infinite \(or beyond float32\)",
        ),
        ({"x": np.zeros((6, 2)), "y": np.array([np.inf] * 6)}, "y_train", r"NaN or infinite"),
        (
            {"x": np.array([[1, "a"]] * 6, dtype=object), "y": np.arange(6) % 2},
            "x",
            r"x cannot be read without unpickling \(an object array\?\)",
        ),
        ({"y": np.zeros(3)}, "x_train", r"missing x_train, y_train, x_val, y_val\. Found: y"),
    ],
    ids=[
        "scalar_x",
        "zero_samples",
        "zero_features",
        "one_class",
        "label_beyond_int32",
        "beyond_float32",
        "infinite_label",
        "object_array",
        "missing_keys",
    ],
)
def test_cases_the_fuzzer_found(tmp_path, contents, array, match):
    path = tmp_path / "d.npz"
    np.savez(path, **contents)
    with pytest.raises(DataError, match=match) as info:
        load_data(path)
    assert info.value.array == array
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "corruption, match",
    [
        ("npy", r"not an \.npz archive \(it holds one array"),
        ("text", r"not a readable \.npz file"),
        ("bad_member", r"x_train (is unreadable|cannot be read)"),
    ],
    ids=["npy", "text", "bad_member"],
)
def test_files_that_are_not_npz_archives(tmp_path, corruption, match):
    path = _write(tmp_path, {}, corruption)
    with pytest.raises(DataError, match=match):
        load_data(path)


def test_check_data_against_model_errors_name_the_model_and_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((6, 4)), y=np.arange(6) % 3)
    data = load_data(path)
    cases = [
        (_Shapes("unbuilt", (None, 3)), "model input", r"m.keras: has no known input shape"),
        (_Shapes([(None, 4), (None, 4)], (None, 3)), "model input", r"has 2 inputs"),
        (_Shapes({"a": (None, 4)}, {"a": (None, 2)}), "y_train", r"has 2 outputs"),
        (_Shapes((None, 5), (None, 3)), "x_train", r"Data shape \(4,\) .* input shape \(None, 5\)"),
    ]
    for model, array, match in cases:
        with pytest.raises(DataError, match=match) as info:
            check_data_against_model(data, model, model_name="m.keras")
        assert info.value.array == array
