"""vitlab's resumable Optuna sweeper (``hydra/sweeper=vitlab_optuna``): Hydra finds it in the ``hydra_plugins``
namespace package. conf/hparams_search/*.yaml select it; see vitlab_optuna_sweeper.py for what it changes."""
