"""Carbon intensity: default, numbers, country codes, arithmetic."""

from __future__ import annotations

import pytest

from keras_lean.energy.carbon import (
    WORLD_AVERAGE_G_PER_KWH,
    emissions_kg,
    known_countries,
    resolve_carbon_intensity,
)


def test_default_is_the_cited_world_average():
    for value in (None, 475.0, 475):
        c = resolve_carbon_intensity(value)
        assert c.g_per_kwh == WORLD_AVERAGE_G_PER_KWH == 475.0
        assert "IEA" in c.source and "CodeCarbon" in c.source


def test_number_is_taken_as_given():
    c = resolve_carbon_intensity(120)
    assert c.g_per_kwh == 120.0 and c.source.startswith("user-supplied")
    assert c.country_iso_code is None


@pytest.mark.parametrize(
    "code", ["FRA", "FR", "fr", " fra "], ids=["alpha3", "alpha2", "lower", "spaces"]
)
def test_country_codes(code):
    c = resolve_carbon_intensity(code)
    assert (c.g_per_kwh, c.country_iso_code, c.country_name) == (53.26, "FRA", "France")
    assert "Our World in Data" in c.source


def test_table_is_sane():
    codes = known_countries()
    assert len(codes) >= 20 and all(len(c) == 3 for c in codes)
    values = [resolve_carbon_intensity(c).g_per_kwh for c in codes]
    assert all(10 < v < 1000 for v in values)
    # Hydro/nuclear grids are far cleaner than coal-heavy ones.
    assert resolve_carbon_intensity("NO").g_per_kwh < resolve_carbon_intensity("PL").g_per_kwh


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("ZZZ", ValueError, "country code must be one of"),
        (0, ValueError, "positive finite number"),
        (float("nan"), ValueError, "positive finite number"),
        (float("inf"), ValueError, "positive finite number"),
        (True, TypeError, "must be a number"),
        ([475], TypeError, "Received: type list"),
    ],
    ids=["unknown-code", "zero", "nan", "inf", "bool", "list"],
)
def test_bad_values(value, error, match):
    with pytest.raises(error, match=match):
        resolve_carbon_intensity(value)


def test_emissions_arithmetic():
    # 2 kWh at 475 g/kWh = 950 g = 0.95 kg
    assert emissions_kg(2.0, 475.0) == pytest.approx(0.95)
    assert emissions_kg(0.0, 475.0) == 0.0
