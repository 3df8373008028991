"""The stage window every step runs in, and the typed entry it records in `report.json`.

    with _stage(run, "finetune", manifest) as rec:   # an energy window named after the step
        rec.accuracy = ...                           # the step fills the recorder
    rec.entry                                        # the StageEntry recorded on success

Nothing is recorded when the block raises, so a failed stage leaves the report as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from keras_lean.energy.carbon import WORLD_AVERAGE_G_PER_KWH

if TYPE_CHECKING:  # pragma: no cover
    from keras_lean.energy import EnergyTracker
    from keras_lean.pipeline.rundir import RunDir

#: gCO2e per kWh used when the run names none (the energy package's world average).
DEFAULT_CARBON_INTENSITY = WORLD_AVERAGE_G_PER_KWH

# Callables told each stage's name as its work begins (see `observe_stages`).
_STAGE_OBSERVERS: list[Callable[[str], None]] = []


@contextlib.contextmanager
def observe_stages(callback: Callable[[str], None]) -> Iterator[None]:
    """Calls `callback(stage)` as each stage begins its work, for the duration of the block.

    A stage begins once its inputs are checked (its energy window opens), so a step refused for
    bad input never announces itself. The CLI prints its stage headings this way.
    """
    _STAGE_OBSERVERS.append(callback)
    try:
        yield
    finally:
        _STAGE_OBSERVERS.remove(callback)


@dataclasses.dataclass
class StageEntry:
    """One stage's entry in `RUN/report.json`.

    Attributes:
        stage: the step's name (`baseline`, `configure`, `finetune`, `validate`, `deploy`).
        started_at: ISO time the stage's energy window opened (None if unknown).
        duration_s: wall time of the stage.
        energy_j: energy of the stage, in joules.
        energy_kwh: the same in kWh.
        energy_method: how it was obtained (`measured (...)` or `estimated (...)`).
        emissions_kg: CO2e of the stage, in kg.
        flops: training or evaluation compute of the stage (None where it cannot be counted).
        accuracy: validation accuracy of the stage's model (None for stages without one).
        params: parameters of the stage's (deployable) model.
        nonzero_params: of which nonzero.
        gzip_bytes: gzip size of the weights (deploy: of the TFLite file).
        details: step-specific record (methods, guard, export report, ...).
    """

    stage: str
    started_at: str | None
    duration_s: float
    energy_j: float
    energy_kwh: float
    energy_method: str
    emissions_kg: float
    flops: float | None = None
    accuracy: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    gzip_bytes: int | None = None
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The `report.json` form (every field, in declaration order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageEntry:
        """Reads a `report.json` entry; keys this version does not know are ignored.

        Raises:
            ValueError: `d` is not a mapping, or lacks one of the fields without a default.
        """
        if not isinstance(d, Mapping):
            raise ValueError(
                f"A report stage entry must be an object. Received: {type(d).__name__}"
            )
        fields = dataclasses.fields(cls)
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and (f.default_factory is dataclasses.MISSING)
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(
                f"report stage entry {d.get('stage', '?')!r} lacks {', '.join(missing)}; "
                f"re-run that step to rewrite it."
            )
        kwargs = {f.name: d[f.name] for f in fields if f.name in d}
        if kwargs.get("details") is None:
            kwargs["details"] = {}
        return cls(**kwargs)


@dataclasses.dataclass
class StageRecorder:
    """What a step fills inside `_stage`; the entry is set when the stage ends well.

    Attributes:
        tracker: the stage's `EnergyTracker` (nested windows, the Keras energy callback).
        flops: the stage's compute, if the step counts it after the window opened.
        accuracy: validation accuracy of the stage's model.
        params: parameters of the stage's (deployable) model.
        nonzero_params: of which nonzero.
        gzip_bytes: gzip size of its weights.
        details: step-specific record.
        entry: the recorded `StageEntry` (None until the stage has ended without error).
    """

    tracker: EnergyTracker
    flops: float | None = None
    accuracy: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    gzip_bytes: int | None = None
    details: dict = dataclasses.field(default_factory=dict)
    entry: StageEntry | None = None

    def set_sizes(self, params: int, nonzero_params: int, gzip_bytes: int) -> None:
        self.params, self.nonzero_params, self.gzip_bytes = params, nonzero_params, gzip_bytes


def _tracker(run: RunDir, output_dir, manifest: dict) -> EnergyTracker:
    from keras_lean.energy import EnergyTracker

    energy = manifest.get("energy", {})
    return EnergyTracker(
        output_dir,
        carbon_intensity=energy.get("carbon_intensity", DEFAULT_CARBON_INTENSITY),
        pue=energy.get("pue", 1.0),
        cpu_tdp_w=energy.get("cpu_tdp_w"),
        run_name=run.name,
    )


@contextlib.contextmanager
def _stage(
    run: RunDir, stage: str, manifest: dict, flops: float | None = None
) -> Iterator[StageRecorder]:
    """Runs the block inside an energy window; on success records the stage in report.json.

    The block fills the yielded `StageRecorder`; nothing is recorded if the block raises, so a
    failed stage leaves the report as it was. The energy files follow the same rule: they are
    written to a temporary folder that replaces `energy/<stage>/` only on success; a failed
    attempt's records (the energy it spent) go to `energy/<stage>.failed/`, and the last
    successful run's `energy/<stage>/` stays as it was.
    """
    from keras_lean.pipeline.rundir import atomic_directory

    for observer in tuple(_STAGE_OBSERVERS):
        observer(stage)
    final = run.energy_dir(stage)
    with atomic_directory(final) as tmp:
        try:
            with _tracker(run, tmp, manifest) as tracker:
                recorder = StageRecorder(tracker=tracker)
                with tracker.window(stage, flops=flops) as window:
                    yield recorder
                    if recorder.flops is not None:
                        window.flops = float(recorder.flops)
        except BaseException:
            failed = final.with_name(f"{stage}.failed")
            with contextlib.suppress(OSError):  # never hide the stage's own error
                with atomic_directory(failed) as keep:
                    shutil.copytree(tmp, keep, dirs_exist_ok=True)
            raise
        rec = window.record
        entry = StageEntry(
            stage=stage,
            started_at=rec.start_time,
            duration_s=rec.duration_s,
            energy_j=rec.energy_j,
            energy_kwh=rec.energy_kwh,
            energy_method=rec.method,
            emissions_kg=rec.emissions_kg,
            flops=rec.flops,
            accuracy=recorder.accuracy,
            params=recorder.params,
            nonzero_params=recorder.nonzero_params,
            gzip_bytes=recorder.gzip_bytes,
            details=recorder.details,
        )
        # Several processes (--distribution data-parallel): every process's energy, summed.
        from keras_lean.pipeline.distribution import combine_stage_entry

        entry = StageEntry.from_dict(combine_stage_entry(entry.to_dict()))
        run.record_stage(entry.to_dict())
        recorder.entry = entry


__all__ = ["DEFAULT_CARBON_INTENSITY", "StageEntry", "StageRecorder", "observe_stages"]
