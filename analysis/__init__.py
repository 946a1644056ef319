"""Reads results cubes written by `ensemble` and turns them into figures and fits."""
