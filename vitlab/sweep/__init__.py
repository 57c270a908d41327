"""Sweeps: the summary of a multirun (vitlab.sweep.report: sweep_summary.csv + .png, vitlab-sweep-report). The
resumable Optuna sweeper behind conf/hparams_search/ is a Hydra plugin: hydra_plugins/vitlab_optuna_sweeper/."""
