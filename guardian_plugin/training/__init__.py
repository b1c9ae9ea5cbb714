"""Offline detector training: data sources, synthetic sources, sub-detector training, calibration."""
