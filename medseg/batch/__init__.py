"""Batch processing of scan folders: discovery, one job per scan."""
