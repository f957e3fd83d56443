"""Retrofit by logit distillation: the train step and a whole run.

Layout (each module imports only modules listed before it, the model side and ``dms_jax.data``; none imports
``dms_jax.serve``, ``dms_jax.eval`` or ``experiments``):

* ``losses.py`` -- KL(student || teacher) per token and over valid tokens, next-token NLL;
* ``step.py`` -- ``DistillConfig``, the trainable-parameter filter, the optimizer, neuron zeroing, ``distill_loss``
  and the jitted, sharded train step with gradient accumulation;
* ``heldout.py`` -- ``evaluate_heldout``: held-out KL, perplexities and KV statistics with hard decisions;
* ``records.py`` -- the run's files besides checkpoints: starts.jsonl, metrics.jsonl, the plot, results JSON;
* ``presets.py`` -- the named recipes (``--preset``) and the CLI's defaults;
* ``distill.py`` -- settings checked before any compute, and ``run_retrofit`` (data, mesh,
  checkpoints / resume, milestones, metrics, evaluation, export), which ``python -m experiments.distill`` calls.
"""
