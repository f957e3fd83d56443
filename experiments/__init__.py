"""Thin command-line entry points over dms_jax: `python -m experiments.<name> --help`."""
