"""Experiments that live beside the library: data, models, training and the report."""
