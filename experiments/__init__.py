"""Studies: compare, ablate, sweep and benchmark; their tables and plotly figures."""
