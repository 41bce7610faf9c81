"""EnuDatum: WGS84 <-> local ENU, checked against independent formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_localizer.geodesy import EnuDatum

WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)
MEAN_EARTH_RADIUS = 6371008.8  # IUGG mean radius, for haversine

DATUMS = [
    EnuDatum(55.7, 13.19, 0.0),        # Lund (north-east)
    EnuDatum(-33.87, 151.21, 58.0),    # Sydney (south-east), altitude != 0
    EnuDatum(40.71, -74.01, -25.0),    # New York (north-west), negative altitude
    EnuDatum(-22.95, -43.21, 850.0),   # Rio de Janeiro (south-west), high datum
    EnuDatum(-0.1, -0.2, 12.5),        # near equator and prime meridian
]


def _ecef(lat, lon, h):
    phi, lam = np.radians(lat), np.radians(lon)
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(phi) ** 2)
    return np.stack([(n + h) * np.cos(phi) * np.cos(lam),
                     (n + h) * np.cos(phi) * np.sin(lam),
                     (n * (1.0 - WGS84_E2) + h) * np.sin(phi)])


def enu_reference(datum: EnuDatum, lat, lon, h):
    """Geodetic -> ECEF -> ENU, written out from the textbook formulas."""
    d = _ecef(np.asarray(lat, float), np.asarray(lon, float), np.asarray(h, float)) - \
        _ecef(np.float64(datum.lat), np.float64(datum.lon), np.float64(datum.alt)).reshape(3, *([1] * np.ndim(lat)))
    phi0, lam0 = math.radians(datum.lat), math.radians(datum.lon)
    e = -math.sin(lam0) * d[0] + math.cos(lam0) * d[1]
    n = (-math.sin(phi0) * math.cos(lam0) * d[0] - math.sin(phi0) * math.sin(lam0) * d[1]
         + math.cos(phi0) * d[2])
    u = (math.cos(phi0) * math.cos(lam0) * d[0] + math.cos(phi0) * math.sin(lam0) * d[1]
         + math.sin(phi0) * d[2])
    return e, n, u


def haversine_m(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * MEAN_EARTH_RADIUS * math.asin(math.sqrt(a))


def _offsets(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    e = rng.uniform(-50e3, 50e3, n)
    nn = rng.uniform(-50e3, 50e3, n)
    u = rng.uniform(-200.0, 800.0, n)
    return e, nn, u


@pytest.mark.parametrize("datum", DATUMS, ids=lambda d: f"{d.lat},{d.lon},{d.alt}")
def test_enu_to_geodetic_to_enu_round_trip(datum):
    e, n, u = _offsets(seed=int(abs(datum.lat) * 100))
    lat, lon, alt = datum.to_geodetic(e, n, u)
    assert lat.shape == lon.shape == alt.shape == e.shape
    # a 50 km offset is up to ~0.45 deg of latitude (and more of longitude away from the equator)
    assert np.abs(lat - datum.lat).max() > 0.3
    e2, n2, u2 = datum.to_enu(lat, lon, alt)
    np.testing.assert_allclose(e2, e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(n2, n, rtol=0, atol=1e-6)
    np.testing.assert_allclose(u2, u, rtol=0, atol=1e-6)


@pytest.mark.parametrize("datum", DATUMS, ids=lambda d: f"{d.lat},{d.lon},{d.alt}")
def test_geodetic_to_enu_to_geodetic_round_trip(datum):
    rng = np.random.default_rng(int(abs(datum.lon) * 100))
    lat = datum.lat + rng.uniform(-0.45, 0.45, 200)
    lon = datum.lon + rng.uniform(-0.45, 0.45, 200)
    alt = datum.alt + rng.uniform(-100.0, 500.0, 200)
    e, n, u = datum.to_enu(lat, lon, alt)
    assert np.hypot(e, n).max() < 80e3
    lat2, lon2, alt2 = datum.to_geodetic(e, n, u)
    np.testing.assert_allclose(lat2, lat, rtol=0, atol=1e-9)
    np.testing.assert_allclose(lon2, lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(alt2, alt, rtol=0, atol=1e-6)


@pytest.mark.parametrize("datum", DATUMS, ids=lambda d: f"{d.lat},{d.lon},{d.alt}")
def test_to_enu_matches_textbook_ecef_formulas(datum):
    rng = np.random.default_rng(1)
    lat = datum.lat + rng.uniform(-0.4, 0.4, 50)
    lon = datum.lon + rng.uniform(-0.4, 0.4, 50)
    alt = datum.alt + rng.uniform(-100.0, 500.0, 50)
    e, n, u = datum.to_enu(lat, lon, alt)
    re, rn, ru = enu_reference(datum, lat, lon, alt)
    np.testing.assert_allclose(e, re, rtol=0, atol=1e-6)
    np.testing.assert_allclose(n, rn, rtol=0, atol=1e-6)
    np.testing.assert_allclose(u, ru, rtol=0, atol=1e-6)


def test_datum_maps_to_origin_and_default_altitudes():
    d = EnuDatum(55.7, 13.19, 42.0)
    e, n, u = d.to_enu(55.7, 13.19)  # alt None = datum height
    assert abs(float(e)) < 1e-6 and abs(float(n)) < 1e-6 and abs(float(u)) < 1e-6
    lat, lon, alt = d.to_geodetic(0.0, 0.0)  # u None = 0
    assert float(lat) == pytest.approx(55.7, abs=1e-12)
    assert float(lon) == pytest.approx(13.19, abs=1e-12)
    assert float(alt) == pytest.approx(42.0, abs=1e-6)
    # alt None means the datum's height, not 0
    _, _, u0 = d.to_enu(55.7, 13.19, 0.0)
    assert float(u0) == pytest.approx(-42.0, abs=1e-6)


def test_known_distance_north_at_55_7():
    d = EnuDatum(55.7, 13.19, 0.0)
    e, n, u = (float(v) for v in d.to_enu(55.701, 13.19))
    # meridian radius of curvature M = a (1 - e^2) / (1 - e^2 sin^2 phi)^(3/2)
    phi = math.radians(55.7005)
    m = WGS84_A * (1 - WGS84_E2) / (1 - WGS84_E2 * math.sin(phi) ** 2) ** 1.5
    expected_ellipsoid = m * math.radians(0.001)
    expected_sphere = haversine_m(55.7, 13.19, 55.701, 13.19)
    assert expected_sphere == pytest.approx(111.2, abs=0.05)
    assert n == pytest.approx(expected_sphere, rel=5e-3)
    assert n == pytest.approx(expected_ellipsoid, rel=1e-5)
    assert abs(e) < 1e-6
    assert -0.01 < u < 0  # the tangent plane rises above the curved surface


def test_known_distance_east_at_55_7():
    d = EnuDatum(55.7, 13.19, 0.0)
    e, n, _ = (float(v) for v in d.to_enu(55.7, 13.191))
    phi = math.radians(55.7)
    prime_vertical = WGS84_A / math.sqrt(1 - WGS84_E2 * math.sin(phi) ** 2)
    assert e == pytest.approx(prime_vertical * math.cos(phi) * math.radians(0.001), rel=1e-5)
    assert e == pytest.approx(haversine_m(55.7, 13.19, 55.7, 13.191), rel=5e-3)
    assert abs(n) < 1e-3


@pytest.mark.parametrize("datum", DATUMS, ids=lambda d: f"{d.lat},{d.lon},{d.alt}")
def test_east_north_signs(datum):
    e, n, _ = datum.to_enu(datum.lat + 0.01, datum.lon)
    assert float(n) > 1000 and abs(float(e)) < 1e-3
    e, n, _ = datum.to_enu(datum.lat - 0.01, datum.lon)
    assert float(n) < -1000
    e, n, _ = datum.to_enu(datum.lat, datum.lon + 0.01)
    assert float(e) > 500 and abs(float(n)) < 10
    e, n, _ = datum.to_enu(datum.lat, datum.lon - 0.01)
    assert float(e) < -500
    lat, lon, _ = datum.to_geodetic(1000.0, 2000.0)
    assert float(lon) > datum.lon and float(lat) > datum.lat


def test_as_dict():
    assert EnuDatum(1.5, -2.25, 3.0).as_dict() == {"lat": 1.5, "lon": -2.25, "alt": 3.0}
