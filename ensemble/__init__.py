"""Batched-ensemble simulator of SGD training (Sclocchi, Geiger & Wyart, ICML 2023).

Data flow: sweep spec -> cells (alpha, T, P, seed) -> ensemble batches -> Dask tasks that
train one batch each on a device -> results in an xarray/Zarr cube.
"""

__version__ = "0.1.0"
