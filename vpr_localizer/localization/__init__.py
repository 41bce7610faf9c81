"""Localisation against a map: retrieval and pose estimation."""
