"""Exception hierarchy of vpr_localizer.

Every error a user can cause (bad input file, wrong map, missing weights) is a
:class:`VprError`; the command line turns it into one readable line and a non-zero
exit status, and the ROS nodes log it and keep running.
"""


class VprError(Exception):
    """Base class of all user-facing errors of vpr_localizer."""


class ImageLoadError(VprError):
    """An image file is missing, empty, truncated or not decodable, or an image array is invalid."""


class WeightsError(VprError):
    """A weight file or encoder checkpoint is missing, corrupt or does not fit the architecture."""


class MapError(VprError):
    """A map directory is missing, truncated, corrupt or of an unknown format version."""


class FingerprintMismatchError(MapError):
    """The map was built with a different encoder than the one running now."""


class ConfigError(VprError, ValueError):
    """A configuration value is invalid (bad parameter, unavailable device); fatal at start-up."""


class DatasetError(VprError):
    """An image folder, CSV or ground-truth description is missing or malformed."""
