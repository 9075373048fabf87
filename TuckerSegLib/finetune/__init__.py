"""Recovering quality at high compression: calibration data, data-aware factors, distillation."""
