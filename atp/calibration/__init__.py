"""Recipes fitted from calibration statistics (no training)."""
