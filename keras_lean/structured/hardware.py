"""Hardware-friendly widths: `round_to="auto"` rounds surviving widths to the CPU's vector lanes.

A convolution or matmul kernel processes output channels in tiles of the CPU's vector width
(XNNPACK, oneDNN and XLA's CPU backend all do). A layer with 22 channels on an AVX-512 machine
(16 float32 lanes) costs as much as one with 32: the FLOPs fall but the time does not.
`scripts/bench_structured.py` measures this; rounding surviving widths up to a multiple of the
lane count is what turns removed FLOPs into realized speed.

`simd_lanes()` reads the instruction-set flags of this machine (Linux `/proc/cpuinfo`) and returns
the float32 lanes of its widest vector unit: 16 with AVX-512, 8 with AVX/AVX2, 4 with SSE or
ARM NEON/ASIMD. Where the flags cannot be read it returns 8 (AVX2, the common x86 server floor).
Prune on the machine you deploy to, or pass an integer `round_to` for another target.
"""

from __future__ import annotations

import os

__all__ = ["AUTO", "DEFAULT_LANES", "resolve_round_to", "simd_lanes"]

AUTO = "auto"
DEFAULT_LANES = 8
_CPUINFO = "/proc/cpuinfo"


def simd_lanes(cpuinfo: str | os.PathLike | None = None) -> int:
    """Float32 lanes of this CPU's widest vector unit (16, 8 or 4; 8 when unknown).

    Args:
        cpuinfo: the `/proc/cpuinfo`-format file to read (default: this machine's).

    Returns:
        16 for AVX-512 (`avx512f`), 8 for AVX or AVX2, 4 for SSE or ARM NEON (`asimd`, `neon`),
        `DEFAULT_LANES` (8) when the file is missing or names none of these.
    """
    try:
        with open(cpuinfo or _CPUINFO, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return DEFAULT_LANES
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if "avx512f" in flags:
        return 16
    if flags & {"avx", "avx2"}:
        return 8
    if flags & {"sse", "sse2", "asimd", "neon"}:
        return 4
    return DEFAULT_LANES


def resolve_round_to(round_to: int | str) -> int:
    """`round_to` as an integer: `"auto"` becomes `simd_lanes()`, an integer >= 1 stays.

    Raises:
        ValueError: for anything else, naming the value received.
    """
    if isinstance(round_to, str) and round_to.strip().lower() == AUTO:
        return simd_lanes()
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(
            f'round_to must be an integer >= 1 or "auto". Received: round_to={round_to!r}'
        )
    return round_to
