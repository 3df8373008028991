"""`round_to="auto"`: the CPU's float32 vector lanes, read from a cpuinfo file."""

from __future__ import annotations

import pytest

import keras_lean.structured.hardware as hardware
from keras_lean.structured import prune_structured, resolve_round_to, simd_lanes

from ._structured_models import dense_mlp

_X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 {extra}\n\n"
_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    "text, lanes",
    [
        (_X86.format(extra="avx avx2 avx512f avx512bw"), 16),
        (_X86.format(extra="avx avx2 fma"), 8),
        (_X86.format(extra="avx"), 8),
        (_X86.format(extra="ssse3"), 4),
        (_ARM, 4),
        ("processor\t: 0\nmodel name\t: unknown\n", hardware.DEFAULT_LANES),
    ],
    ids=["avx512", "avx2", "avx", "sse", "arm-neon", "no-flags"],
)
def test_simd_lanes_from_cpuinfo(tmp_path, text, lanes):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert simd_lanes(path) == lanes


def test_unreadable_cpuinfo_falls_back(tmp_path):
    assert simd_lanes(tmp_path / "missing") == hardware.DEFAULT_LANES == 8


def test_resolve_round_to(monkeypatch):
    monkeypatch.setattr(hardware, "simd_lanes", lambda: 16)
    assert resolve_round_to("auto") == resolve_round_to(" AUTO ") == 16
    assert resolve_round_to(3) == 3


@pytest.mark.parametrize("bad", [0, -8, 2.0, True, "eight", None], ids=str)
def test_resolve_round_to_errors(bad):
    with pytest.raises(ValueError, match=r'round_to must be an integer >= 1 or "auto"'):
        resolve_round_to(bad)


def test_prune_structured_auto_rounds_to_lanes(monkeypatch):
    monkeypatch.setattr(hardware, "simd_lanes", lambda: 5)
    pruned = prune_structured(dense_mlp(), 0.5, round_to="auto")
    # d1: 12 -> keep 6 -> 10 (a multiple of 5); d2: 8 -> keep 4 -> 5.
    assert (pruned.get_layer("d1").units, pruned.get_layer("d2").units) == (10, 5)
