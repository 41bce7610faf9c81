"""vpr_localizer: camera-only localisation by visual place recognition.

The ROS-free core: backbones and NetVLAD (:mod:`.encoder`), the geotagged map (:mod:`.map_store`,
:mod:`.mapping`), retrieval and pose estimation (:mod:`.localize`), evaluation (:mod:`.evaluate`)
and the ``vpr-localizer`` command line (:mod:`.cli`).
"""

import os as _os

# torch and faiss each bring an OpenMP runtime; with the default (active) wait policy their idle
# threads spin against each other on small CPUs, which made a 6-image map build 5x slower on a
# 2-core machine. Passive waiting costs nothing measurable on large batches. Only takes effect
# when set before torch/faiss are first imported; an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
