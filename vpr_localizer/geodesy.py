"""WGS84 geodetic <-> local ENU (east, north, up) conversion, through pymap3d.

The map frame of a geotagged map is a local tangent plane (ENU, REP-103: x east, y north,
z up, metres) whose origin (the *datum*) is stored in ``map.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import pymap3d


@dataclass(frozen=True)
class EnuDatum:
    """Origin of a local ENU frame on the WGS84 ellipsoid.

    Attributes:
        lat: latitude of the origin, degrees.
        lon: longitude of the origin, degrees.
        alt: ellipsoidal height of the origin, metres.
    """

    lat: float
    lon: float
    alt: float = 0.0

    def to_enu(self, lat, lon, alt=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Geodetic (degrees, metres) to ENU (metres); scalars or arrays of equal shape.

        ``alt`` None means "at the datum's height".
        """
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        alt = np.full_like(lat, self.alt) if alt is None else np.asarray(alt, dtype=np.float64)
        e, n, u = pymap3d.geodetic2enu(lat, lon, alt, self.lat, self.lon, self.alt)
        return np.asarray(e), np.asarray(n), np.asarray(u)

    def to_geodetic(self, e, n, u=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ENU (metres) to geodetic (latitude, longitude in degrees; altitude in metres)."""
        e = np.asarray(e, dtype=np.float64)
        n = np.asarray(n, dtype=np.float64)
        u = np.zeros_like(e) if u is None else np.asarray(u, dtype=np.float64)
        lat, lon, alt = pymap3d.enu2geodetic(e, n, u, self.lat, self.lon, self.alt)
        return np.asarray(lat), np.asarray(lon), np.asarray(alt)

    def as_dict(self) -> dict:
        return {"lat": float(self.lat), "lon": float(self.lon), "alt": float(self.alt)}
