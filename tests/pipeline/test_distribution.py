"""Multi-process data-parallel training on JAX's engine, really run (processes on 127.0.0.1).

Runs in both CI invocations: the training happens in `KERAS_BACKEND=jax` subprocesses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_lean.pipeline.distribution import (
    DistributionError,
    DistributionSpec,
    local_rows,
    parse_coordinator,
)

# Fine-tunes a wrapped CNN. MODE "devices": one device (the reference), then DataParallel over
# this process's host devices; "process": one of N processes joined by jax.distributed.
_WORKER = """
import sys, numpy as np, keras, keras_lean as kl
from keras_lean.pipeline import distribution as dist
from keras_lean.sparsity import PolynomialDecay, get_masks


def train(out, index=0, count=1):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype="float32"); y = rng.integers(0, 3, 64).astype("int32")
    model = keras.Sequential([keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv"), keras.layers.Flatten(),
        keras.layers.Dense(3, name="out")])  # fixed names: two runs in one process
    pruned = kl.prune_low_magnitude(model, PolynomialDecay(0.0, 0.6, 0, 6, frequency=1))
    pruned.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rows = dist.local_rows(len(x), 16, index, count)
    pruned.fit(x[rows], y[rows], batch_size=16 // count, epochs=2, shuffle=False, verbose=0)
    masks = {f"mask/{k}": v for k, v in get_masks(pruned).items()}
    weights = {f"w{i}": w for i, w in enumerate(pruned.get_weights())}
    devices = len(keras.distribution.distribution().device_mesh.devices.reshape(-1)) if (
        keras.distribution.distribution() is not None) else 1
    np.savez(out, devices=devices, **masks, **weights)


mode, out = sys.argv[1], sys.argv[2]
if mode == "process":
    spec = dist.DistributionSpec(sys.argv[3], sys.argv[4], sys.argv[5], timeout_s=sys.argv[6])
    dist.initialize(spec)
    train(out, dist.process_index(), dist.process_count())
else:  # one process: the reference on one device, then DataParallel over the host devices
    train(sys.argv[3])
    dist.initialize(dist.DistributionSpec())
    train(out)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, name, *args, devices=1):
    script = tmp_path / "worker.py"
    if not script.exists():  # written once: a rewrite while a worker reads it runs an empty script
        partial = tmp_path / "worker.py.partial"
        partial.write_text(textwrap.dedent(_WORKER))
        partial.replace(script)
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, str(script), args[0], str(out), *map(str, args[1:])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, out


def _finish(proc, out):
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, log.decode()[-3000:]
    return dict(np.load(out))


def test_two_processes_and_two_devices_match_one_process(tmp_path):
    port = _free_port()
    single = tmp_path / "single.npz"
    runs = {
        "devices": _start(tmp_path, "devices", "devices", single, devices=2),
        **{
            f"p{i}": _start(tmp_path, f"p{i}", "process", f"127.0.0.1:{port}", 2, i, 120)
            for i in range(2)
        },
    }
    result = {name: _finish(*run) for name, run in runs.items()}
    assert int(result["devices"]["devices"]) == 2 and int(result["p0"]["devices"]) == 2
    reference = dict(np.load(single))
    assert int(reference["devices"]) == 1
    masks = [k for k in reference if k.startswith("mask/")]
    assert masks and 0.55 < np.mean([1 - reference[k].mean() for k in masks]) < 0.65
    for key in reference:
        if key == "devices":
            continue
        # The two processes hold the very same replicated values.
        np.testing.assert_array_equal(result["p0"][key], result["p1"][key], err_msg=key)
        for name in ("p0", "devices"):
            if key.startswith("mask/"):
                np.testing.assert_array_equal(result[name][key], reference[key], err_msg=name)
            else:
                np.testing.assert_allclose(
                    result[name][key], reference[key], rtol=1e-4, atol=1e-5, err_msg=name
                )


def test_unreachable_coordinator_is_one_line(tmp_path):
    proc, out = _start(tmp_path, "lonely", "process", f"127.0.0.1:{_free_port()}", 2, 1, 3)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert b"could not reach the coordinator" in log and b"within 3 s" in log


@pytest.mark.parametrize(
    "text",
    ["localhost", "host:port", "host:0", "host:70000", ":123", "a b:12"],
    ids=["no-port", "word-port", "zero", "too-big", "no-host", "space"],
)
def test_malformed_coordinator(text):
    with pytest.raises(DistributionError, match="--coordinator must be HOST:PORT"):
        parse_coordinator(text)


def test_good_coordinators():
    assert parse_coordinator("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_coordinator("node-3.cluster:80") == ("node-3.cluster", 80)
    assert parse_coordinator("[::1]:9000") == ("[::1]", 9000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": 2},
            r"process-id must be in 0\.\.1",
        ),
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": "x"},
            "process-id must be an int",
        ),
        ({"coordinator": "h:1", "num_processes": 0}, "num-processes must be an integer >= 1"),
        ({"num_processes": 2, "process_id": 0}, "--coordinator HOST:PORT is needed"),
    ],
    ids=["id-too-big", "id-not-int", "zero-processes", "no-coordinator"],
)
def test_bad_process_settings(kwargs, match):
    with pytest.raises(DistributionError, match=match):
        DistributionSpec(**kwargs)


def test_settings_from_the_standard_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:4000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    spec = DistributionSpec.resolve(process_id=1)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("10.0.0.1:4000", 4, 1)


def test_local_rows_rebuild_the_global_batches():
    parts = [local_rows(20, 8, i, 2) for i in range(2)]
    batches = [np.concatenate([p[k * 4 : k * 4 + 4] for p in parts]) for k in range(2)]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(16))
    with pytest.raises(DistributionError, match="multiple of the 3 processes"):
        local_rows(20, 8, 0, 3)


def _cli(*args):
    from click.testing import CliRunner

    from keras_lean.cli import cli

    return CliRunner().invoke(cli, ["run", *args])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--coordinator", "nohost"], "need --distribution data-parallel"),
        (["--distribution", "data-parallel", "--coordinator", "h:99999"], "HOST:PORT"),
        (
            ["--distribution", "data-parallel", "--num-processes", "2", "--process-id", "5"],
            "process-id must be in 0..1",
        ),
    ],
    ids=["flags-without-distribution", "bad-port", "bad-process-id"],
)
def test_cli_bad_distribution_settings_exit_2(tmp_path, args, match):
    r = _cli("--out", str(tmp_path / "run"), *args)
    assert r.exit_code == 2, r.output
    assert match in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="joins processes under JAX only")
def test_cli_process_that_cannot_reach_the_coordinator_exits_2(tmp_path):
    r = _cli(
        "--out",
        str(tmp_path / "run"),
        "--distribution",
        "data-parallel",
        "--coordinator",
        f"127.0.0.1:{_free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--coordinator-timeout",
        "1",
    )
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "could not reach the coordinator" in r.output and "within 1 s" in r.output
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_coordinator_timeout_must_be_positive(tmp_path):
    r = _cli("--out", str(tmp_path / "run"), "--coordinator-timeout", "5")
    assert r.exit_code == 2 and "need --distribution data-parallel" in r.output, r.output
    with pytest.raises(DistributionError, match="--coordinator-timeout must be an integer >= 1"):
        DistributionSpec(timeout_s=0)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow refusals")
def test_tensorflow_refuses_multiworker_and_jax_only_distribution(tmp_path):
    from keras_lean.pipeline.strategy import get_strategy

    with pytest.raises(ValueError, match=r"keras-team/keras#20585.*KERAS_BACKEND=jax"):
        get_strategy("multiworker")
    r = _cli("--out", str(tmp_path / "run"), "--distribution", "data-parallel")
    assert r.exit_code == 2 and "needs the JAX backend (KERAS_BACKEND=jax)" in r.output, r.output


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX refusals")
def test_jax_refuses_tf_distribute_strategies():
    from keras_lean.pipeline.strategy import get_strategy

    with pytest.raises(ValueError, match="needs KERAS_BACKEND=tensorflow"):
        get_strategy("mirrored")
