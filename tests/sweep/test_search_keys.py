"""The Optuna sweeper's key check accepts every key of the config, whatever its value, and only those."""

from omegaconf import OmegaConf

from hydra_plugins.vitlab_optuna_sweeper._impl import _has_key


def test_required_and_interpolated_values_are_keys_and_typos_are_not():
    cfg = OmegaConf.create({"data": {"source": {"num_classes": "???", "root": "${oc.env:NOPE_NOT_SET}"}}, "seed": 0})
    OmegaConf.set_struct(cfg, True)
    assert _has_key(cfg, "data.source.num_classes")          # a required ??? value is still a key
    assert _has_key(cfg, "data.source.root")                 # so is an interpolation that cannot resolve yet
    assert _has_key(cfg, "seed")
    assert not _has_key(cfg, "data.source.num_clases")
    assert not _has_key(cfg, "sed")
    assert not _has_key(cfg, "data.nope.x")
