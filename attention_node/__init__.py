"""attention_node: camera image (+ segmentation labels) -> NetVLAD descriptor (``vpr/descriptor``),
patch descriptors and an attention heat map (``vpr/attention``).

The encoder is rebuilt from the map (:func:`vpr_localizer.localization.localize.encoder_for_map`), so the
published descriptors match the map's fingerprint. The learned attention module and the
segmentation-guided descriptor come with the segmentation/attention issue, on the same topics.
"""
