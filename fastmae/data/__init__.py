"""Data loading: sources, CPU and GPU pipelines behind one interface."""
