"""Reads results cubes written by `ensemble` and turns them into figures and fits.

Read-only on cubes; never imports torch or the engine, only `ensemble.schema`. Data flow
(imports point backwards only):

- `analysis.load`        cube store -> {experiment: lazy xarray Dataset}
- `analysis.aggregate`   seed means / standard errors / counts / bootstrap, converged only
- `analysis.interpolate` where a curve crosses a level, in log T
- `analysis.fits`        power laws in log space (rel_change ~ T^delta P^gamma, t* ~ T^c P^b)
- `analysis.crossover`   T_c(P) by two definitions, T_c ~ P^-a, the check a = gamma/delta
- `analysis.perceptron`  signal, noise, t* of the perceptron against the predictions
- `analysis.plots`       matplotlib figures (no pyplot), every axis with symbol and units
- `analysis.report`      ``write_report(store, out_dir)``: figures and report.md
- `analysis.cli`         ``python -m analysis report STORE --out DIR``
"""
