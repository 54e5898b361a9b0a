"""Radiology report generation (RRG): data, model, labeler, metrics and training."""
