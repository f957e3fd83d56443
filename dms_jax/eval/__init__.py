"""Evaluation: the tasks, the sweeps over methods and budgets, the benchmarks' measurements, and the reports built
from the results files that experiments.evaluate, experiments.distill and benchmarks/ write.

Layout (each module imports only modules listed before it, and dms_jax's model, serving, data and training side;
nothing there imports dms_jax.eval):

* ``prompts.py`` -- ``Case``, the fillers (incl. natural held-out prose), haystacks sized in tokens, shared checks;
* ``passkey.py`` (passkey, multikey), ``variable_tracking.py``, ``arithmetic.py`` -- the tasks' case generators
  and scorers, each in several wording families;
* ``tasks.py`` -- the registry: ``TASKS``, ``WORDINGS``, ``make_cases``, ``score``, ``score_answer``,
  ``majority_vote``;
* ``stats.py`` -- confidence intervals, compression and per-wording summaries;
* ``sweep.py`` -- sweep presets, checkpoints, jobs and the ``Runner`` that runs a point on the paged engine;
* ``report.py`` -- results files, the Pareto plot and table;
* ``hyperscale.py`` -- majority voting over sampled chains at equal memory;
* ``run.py`` -- a sweep end to end from the CLI's flags (``python -m experiments.evaluate``);
* ``retrofit_report.py`` -- the retrofit's milestones against its targets (``python -m experiments.retrofit_report``);
* ``side_by_side.py`` -- the original model and its retrofit on the same prompts (``python -m experiments.demo``);
* ``bench_decode.py`` -- the engine decode benchmark's workload and measurements
  (``python benchmarks/bench_engine_decode.py``).

Nothing is re-exported here: import from the defining module.
"""
