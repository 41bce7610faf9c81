"""vpr_localizer: camera-only localisation by visual place recognition.

The ROS-free core: backbones and NetVLAD (:mod:`.encoder`), the geotagged map (:mod:`.map_store`,
:mod:`.mapping`), retrieval and pose estimation (:mod:`.localize`), evaluation (:mod:`.evaluate`)
and the ``vpr-localizer`` command line (:mod:`.cli`).
"""

__version__ = "0.1.0"
