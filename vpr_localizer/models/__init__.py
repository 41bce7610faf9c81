"""The VPR model: backbones, aggregators (NetVLAD, GeM, GAP), attention, guided NetVLAD, PCA whitening, the encoder."""
