"""Evaluation: reports built from the results files that experiments.evaluate and experiments.distill write."""
