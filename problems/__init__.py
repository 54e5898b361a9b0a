"""Synthetic Pareto problems with known fronts, and the radiology report generation workload."""
