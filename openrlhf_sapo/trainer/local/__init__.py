"""The single-process backend: upstream's trainer and workers in one process (see cli/train_local.py)."""
