"""Experiments that live beside the library: data, models, training loops and the report."""
