"""Measurement: parameters, MACs, speed, and their rendering."""
