"""rl-zoo-style tooling: config files, the experiment manager behind ``train``, and the Optuna samplers."""
