"""Reads results cubes written by `ensemble` and turns them into figures and fits.

Read-only on cubes; never imports torch or the engine, only `ensemble.schema`. Data flow
(imports point backwards only):

- `analysis.load`        cube store -> {experiment: lazy xarray Dataset}
- `analysis.aggregate`   seed means / standard errors / counts / bootstrap, converged only
- `analysis.interpolate` where a curve crosses a level, in log T
- `analysis.fits`        power laws in log space (rel_change ~ T^delta P^gamma, t* ~ T^c P^b)
- `analysis.crossing`    where a seed-mean curve crosses a level, bootstrapped over seeds
- `analysis.crossover`   T_c(P) by two definitions, T_c ~ P^-a, the check a = gamma/delta
- `analysis.regimes`     the lazy / feature-learning boundary alpha* from the NTK change
- `analysis.optimal`     T_opt(alpha, P), the lowest test error along T, T_opt ~ alpha^k
- `analysis.stability`   T_div(alpha, P), where half the seeds diverge, T_div ~ alpha^k
- `analysis.perceptron`  signal, noise, t* of the perceptron against the predictions
- `analysis.plots`       matplotlib figures (no pyplot), every axis with symbol and units
- `analysis.report`      ``write_report(store, out_dir)``: figures and report.md
- `analysis.reproduction` the reproduction page from a manifest of cubes
- `analysis.cli`         ``python -m analysis report STORE --out DIR``, ``reproduce``
"""
