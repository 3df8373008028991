"""Carbon intensity of electricity: the world-average default and a small bundled country table.

Values are grams of CO2-equivalent per kWh of electricity *generated* (annual averages, not the
hourly marginal intensity a live grid API would give). They turn joules into kg CO2e for reports;
for a real footprint claim, pass the intensity of your own grid contract as a number.
"""

from __future__ import annotations

import dataclasses

#: World average used when the caller gives nothing: 475 gCO2/kWh, the IEA figure for 2019
#: (Global Energy & CO2 Status Report 2019), also the world default of CodeCarbon and
#: carbontracker, so our figures line up with theirs.
WORLD_AVERAGE_G_PER_KWH = 475.0
WORLD_AVERAGE_SOURCE = (
    "world average 475 gCO2/kWh (IEA, Global Energy & CO2 Status Report 2019; "
    "same default as CodeCarbon and carbontracker)"
)

_TABLE_SOURCE = (
    "Ember and Energy Institute, carbon intensity of electricity generation 2023, "
    "via Our World in Data (ourworldindata.org/grapher/carbon-intensity-electricity)"
)

# ISO 3166-1 alpha-3 -> (alpha-2, country name, gCO2e/kWh in 2023). Kept small on purpose: the
# countries most runs happen in. Pass a number for anywhere else.
_COUNTRIES: dict[str, tuple[str, str, float]] = {
    "AUS": ("AU", "Australia", 556.70),
    "AUT": ("AT", "Austria", 111.72),
    "BEL": ("BE", "Belgium", 134.67),
    "BRA": ("BR", "Brazil", 96.26),
    "CAN": ("CA", "Canada", 174.37),
    "CHN": ("CN", "China", 583.04),
    "DEU": ("DE", "Germany", 362.92),
    "DNK": ("DK", "Denmark", 151.96),
    "ESP": ("ES", "Spain", 169.68),
    "FIN": ("FI", "Finland", 81.21),
    "FRA": ("FR", "France", 53.26),
    "GBR": ("GB", "United Kingdom", 235.63),
    "IND": ("IN", "India", 713.36),
    "IRL": ("IE", "Ireland", 282.41),
    "ITA": ("IT", "Italy", 323.23),
    "JPN": ("JP", "Japan", 492.45),
    "KOR": ("KR", "South Korea", 427.29),
    "MEX": ("MX", "Mexico", 489.05),
    "NLD": ("NL", "Netherlands", 268.17),
    "NOR": ("NO", "Norway", 30.46),
    "NZL": ("NZ", "New Zealand", 87.20),
    "POL": ("PL", "Poland", 650.68),
    "PRT": ("PT", "Portugal", 158.43),
    "SGP": ("SG", "Singapore", 500.87),
    "USA": ("US", "United States", 392.89),
    "ZAF": ("ZA", "South Africa", 714.40),
}
_ALPHA2 = {alpha2: alpha3 for alpha3, (alpha2, _, _) in _COUNTRIES.items()}


@dataclasses.dataclass(frozen=True)
class CarbonIntensity:
    """A resolved carbon intensity.

    Attributes:
        g_per_kwh: grams CO2e per kWh.
        source: where the number comes from, in words (stored in every record).
        country_iso_code: ISO 3166-1 alpha-3 code when chosen by country, else None.
        country_name: the country's name when chosen by country, else None.
    """

    g_per_kwh: float
    source: str
    country_iso_code: str | None = None
    country_name: str | None = None


def known_countries() -> tuple[str, ...]:
    """The ISO alpha-3 codes of the bundled table, sorted."""
    return tuple(sorted(_COUNTRIES))


def resolve_carbon_intensity(value: float | int | str | None) -> CarbonIntensity:
    """Turn a number or a country code into a `CarbonIntensity`.

    Args:
        value: gCO2e/kWh as a positive number, an ISO 3166 country code (alpha-3 such as "FRA" or
            alpha-2 such as "FR", any case) from the bundled table, or None for the world average.

    Returns:
        The resolved intensity with its source.

    Raises:
        ValueError: a non-positive number or an unknown country code.
        TypeError: anything else.

    Example:
        >>> resolve_carbon_intensity("FR").g_per_kwh
        53.26
    """
    if value is None:
        return CarbonIntensity(WORLD_AVERAGE_G_PER_KWH, WORLD_AVERAGE_SOURCE)
    if isinstance(value, bool):
        raise TypeError(
            f"carbon_intensity must be a number (gCO2/kWh) or a country code. Received: {value!r}"
        )
    if isinstance(value, (int, float)):
        g = float(value)
        if not g > 0 or g != g or g == float("inf"):
            raise ValueError(
                f"carbon_intensity must be a positive finite number of gCO2/kWh. "
                f"Received: carbon_intensity={value!r}"
            )
        if g == WORLD_AVERAGE_G_PER_KWH:
            return CarbonIntensity(g, WORLD_AVERAGE_SOURCE)
        return CarbonIntensity(g, f"user-supplied {g:g} gCO2/kWh")
    if isinstance(value, str):
        code = value.strip().upper()
        alpha3 = _ALPHA2.get(code, code)
        if alpha3 not in _COUNTRIES:
            raise ValueError(
                f"carbon_intensity country code must be one of {', '.join(known_countries())} "
                f"(or their alpha-2 codes), or pass a number of gCO2/kWh. "
                f"Received: carbon_intensity={value!r}"
            )
        _, name, g = _COUNTRIES[alpha3]
        return CarbonIntensity(
            g,
            f"{name} {g:g} gCO2e/kWh ({_TABLE_SOURCE})",
            country_iso_code=alpha3,
            country_name=name,
        )
    raise TypeError(
        f"carbon_intensity must be a number (gCO2/kWh) or a country code. "
        f"Received: type {type(value).__name__}"
    )


def emissions_kg(energy_kwh: float, g_per_kwh: float) -> float:
    """kg CO2e for `energy_kwh` of electricity at `g_per_kwh` grams per kWh."""
    return energy_kwh * g_per_kwh / 1000.0
