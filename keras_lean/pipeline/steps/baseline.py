"""Step 1: train a built-in baseline, or adopt and evaluate the user's model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_lean.pipeline.data import check_data_against_model, load_data
from keras_lean.pipeline.models import ARCHITECTURES, build_model, load_model
from keras_lean.pipeline.rundir import RunDir, atomic_write_json, save_model_atomic
from keras_lean.pipeline.steps.common import (
    StageResult,
    as_run,
    classification_loss,
    data_spec,
    evaluate,
    fill_sizes,
    forward_flops,
    outputs_are_probabilities,
    stage_result,
)
from keras_lean.pipeline.steps.stage import DEFAULT_CARBON_INTENSITY, StageRecorder, _stage
from keras_lean.pipeline.strategy import STRATEGIES, get_strategy


def _check_arguments(arch, model_path, strategy, epochs, batch_size, learning_rate) -> None:
    if model_path is None and arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}. Received: arch={arch!r}")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={strategy!r}"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {name}={value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0. Received: learning_rate={learning_rate}")


def train_baseline(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike = "digits",
    arch: str = "cnn",
    model_path: str | os.PathLike | None = None,
    epochs: int = 8,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    val_split: float = 0.2,
    seed: int = 0,
    strategy: str = "default",
    carbon_intensity: float | str = DEFAULT_CARBON_INTENSITY,
    pue: float = 1.0,
    cpu_tdp_w: float | None = None,
    verbose: int = 1,
    callbacks: Sequence = (),
    sequence_length: int | None = None,
) -> StageResult:
    """Step 1: trains a built-in baseline, or adopts and evaluates the user's model.

    Writes `RUN/baseline.keras` and `RUN/manifest.json` (data, architecture, strategy, seed and
    energy settings, which later steps reuse).

    Args:
        out: the run folder.
        data: `digits`, a `.npz` file or an image folder (see `load_data`).
        arch: built-in architecture, one of `ARCHITECTURES` (ignored with `model_path`).
        model_path: a `.keras` model to adopt instead of training one; it is evaluated, not
            trained.
        epochs: training epochs of the built-in model (>= 1).
        batch_size: training batch size (>= 1).
        learning_rate: Adam learning rate (> 0).
        val_split: validation fraction where the data has no split.
        seed: random seed (data split, initialization, shuffling).
        strategy: one of `STRATEGIES` (`tf.distribute`).
        carbon_intensity: gCO2e/kWh or a country code, for every stage of this run.
        pue: data-centre PUE for every stage of this run.
        cpu_tdp_w: CPU TDP in watts for the energy estimate (None: the energy package default).
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).
        callbacks: extra Keras callbacks for the training fit (a progress bar); unused when
            adopting `model_path`.
        sequence_length: tokens per text with text data (`.csv` / `.jsonl`) and a keras-hub
            preset folder as `model_path` (default 128): the texts are tokenized with the
            preset's tokenizer and its backbone gets a classifier head, trained `epochs` epochs
            (see `keras_lean.pipeline.text`). With a `text`-only file (a causal-LM corpus) it
            is the window length, and `model_path` is optional: a keras-hub decoder preset
            folder, or none for the built-in tiny decoder (`text.tiny_decoder`).

    Returns:
        A `StageResult`.

    Raises:
        ValueError: bad arguments, unreadable data or model, or data that does not fit it.
        FileNotFoundError: the data or model file does not exist.
    """
    import keras

    run = as_run(out)
    _check_arguments(arch, model_path, strategy, epochs, batch_size, learning_rate)
    from keras_lean.pipeline import text as _text

    text, preset = None, None
    if _text.is_text_data(data) and _text.is_causal_lm_data(data):
        text = _prepare_causal_lm(run, data, model_path, sequence_length, val_split, seed)
        preset, model_path, data, arch = model_path, None, run.root / "text_data.npz", "causal_lm"
        ds = _text.load_causal_lm_data(data)
    else:
        if model_path is not None and _text.is_preset_dir(model_path) or _text.is_text_data(data):
            text = _prepare_text(run, data, model_path, sequence_length, val_split, seed)
            preset, model_path, data, arch = model_path, None, run.root / "text_data.npz", "text"
        ds = load_data(data, val_split=val_split, seed=seed)
    causal_lm = bool(text) and text.get("task") == _text.CAUSAL_LM
    keras.utils.set_random_seed(seed)
    manifest = {
        "version": 1,
        "data": data_spec(data),
        "val_split": val_split,
        "seed": seed,
        "strategy": strategy,
        "arch": None if model_path is not None else arch,
        "model_source": str(Path(model_path).resolve()) if model_path is not None else None,
        "input_shape": list(ds.x_train.shape[1:]),
        "num_classes": ds.num_classes,
        **({"text": text} if text else {}),
        "energy": {"carbon_intensity": carbon_intensity, "pue": pue, "cpu_tdp_w": cpu_tdp_w},
    }
    # Fail on bad energy settings before any work (the tracker validates them).
    from keras_lean.energy import TrackerConfig

    TrackerConfig(**manifest["energy"])
    strat = get_strategy(strategy)
    if model_path is not None:
        with strat.scope():
            model = load_model(model_path)
        check_data_against_model(ds, model, model_name=str(model_path))
    with _stage(run, "baseline", manifest) as rec:
        details: dict[str, Any] = {"data": manifest["data"], "strategy": strategy}
        if model_path is None:
            model = _train_builtin(
                rec,
                ds,
                strat,
                arch,
                epochs,
                batch_size,
                learning_rate,
                verbose,
                callbacks,
                build=_text_builder(preset, text, ds),
                from_logits=causal_lm,
            )
            from_logits = causal_lm  # a causal LM returns logits, as keras-hub's tasks
            details.update(arch=arch, epochs=epochs, batch_size=batch_size)
            details.update(learning_rate=learning_rate, history=rec.details.pop("history"))
        else:
            from_logits = not outputs_are_probabilities(model, ds.x_val)
            details.update(model_source=manifest["model_source"], from_logits=from_logits)
        manifest["from_logits"] = from_logits
        rec.accuracy = evaluate(model, ds)
        if causal_lm:
            details["perplexity"] = _text.lm_perplexity(model, ds)
        save_model_atomic(model, run.baseline)
        atomic_write_json(run.manifest, manifest)
        fill_sizes(rec, model)
        rec.details = details
    return stage_result("baseline", rec, {"baseline": str(run.baseline)})


def _prepare_text(run: RunDir, data, preset, sequence_length, val_split, seed) -> dict:
    """Tokenizes text data with the preset into RUN/text_data.npz; the manifest's `text`."""
    from keras_lean.pipeline import text as _text

    if not _text.is_preset_dir(preset):
        raise ValueError(
            f"Text data ({data}) needs --model PRESET_DIR: a keras-hub preset folder (or a "
            "Hugging Face model folder keras-hub converts) whose tokenizer and backbone to use. "
            f"Received: model_path={preset!r}"
        )
    if not _text.is_text_data(data):
        raise ValueError(
            f"A preset folder as the model ({preset}) needs text data: a .csv or .jsonl file "
            f"with `text` and `label` columns. Received: data={str(data)!r}"
        )
    length = _text.DEFAULT_SEQUENCE_LENGTH if sequence_length is None else sequence_length
    out = run.root / "text_data.npz"
    return _text.prepare_text_data(
        data, preset, out, sequence_length=length, val_split=val_split, seed=seed
    )


def _prepare_causal_lm(run: RunDir, data, preset, sequence_length, val_split, seed) -> dict:
    """Tokenizes a causal-LM corpus into RUN/text_data.npz; the manifest's `text`."""
    from keras_lean.pipeline import text as _text

    if preset is not None and not _text.is_preset_dir(preset):
        raise ValueError(
            f"A causal-LM corpus ({data}: a `text` column, no `label`) takes as --model a "
            "keras-hub decoder preset folder (GPT-2, Llama, ...; save_to_preset), or no --model "
            f"for the built-in tiny decoder. Received: model_path={str(preset)!r}"
        )
    length = _text.DEFAULT_SEQUENCE_LENGTH if sequence_length is None else sequence_length
    out = run.root / "text_data.npz"
    return _text.prepare_causal_lm_data(
        data, preset, out, sequence_length=length, val_split=val_split, seed=seed
    )


def _text_builder(preset, text: dict | None, ds):
    if text is None:
        return None
    from keras_lean.pipeline import text as _text

    if text.get("task") == _text.CAUSAL_LM:
        length, vocab = text["sequence_length"], text["vocabulary_size"]
        return lambda: _text.build_causal_lm(preset, length, vocab)

    return lambda: _text.build_text_classifier(preset, ds.num_classes, text["sequence_length"])


def _train_builtin(
    rec: StageRecorder,
    ds,
    strat,
    arch,
    epochs,
    batch_size,
    learning_rate,
    verbose,
    callbacks=(),
    build=None,
    from_logits=False,
):
    """Builds and trains a built-in architecture (or `build()`'s model); records its FLOPs and
    history in `rec`."""
    import keras

    with strat.scope():
        model = build() if build else build_model(arch, ds.x_train.shape[1:], ds.num_classes)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=classification_loss(from_logits),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    from keras_lean.pipeline.distribution import local_arrays

    # Several processes (--distribution data-parallel): each feeds its rows of every batch.
    x, y, local_batch_size = local_arrays(ds.x_train, ds.y_train, batch_size)
    history = model.fit(
        x,
        y,
        batch_size=local_batch_size,
        epochs=epochs,
        validation_data=(ds.x_val, ds.y_val),
        callbacks=[rec.tracker.callback(), *callbacks],
        verbose=verbose,
    )
    fwd = forward_flops(model)
    rec.flops = None if fwd is None else 3 * fwd * len(ds.x_train) * epochs
    rec.details["history"] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return model
