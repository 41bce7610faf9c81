"""Training: triplet training of NetVLAD + attention, photometric night simulation."""
