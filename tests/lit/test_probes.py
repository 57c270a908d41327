"""The KNNMonitor callback (vitlab.lit.probes): when it runs, what it logs, and that it leaves the model as it was."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vitlab.lit.probes import KNNMonitor, autocast_dtype


class StubRecipe(nn.Module):
    """Features = the flattened image; a dropout child kept in eval mode stands for an EMA teacher."""

    def __init__(self, pretraining: bool = True):
        super().__init__()
        self.pretraining = pretraining
        self.proj = nn.Identity()
        self.teacher = nn.Dropout(0.5)
        self.calls = 0
        self.modes_seen: list[bool] = []

    def features(self, images: torch.Tensor, feature: str = "pooled") -> torch.Tensor:
        self.calls += 1
        self.modes_seen.append(self.training)
        return self.proj(images.flatten(1))


class StubDataModule:
    """Two well-separated classes of 2x2 'images', in dict batches of 8."""

    def __init__(self):
        self.requests: list[tuple] = []

    def eval_loader(self, split: str, batch_size=None, max_samples=None, num_workers=None) -> list[dict]:
        self.requests.append((split, max_samples, num_workers))
        n = {"train": 40, "val": 16}[split]
        y = torch.arange(n) % 2
        x = torch.where(y[:, None] == 0, torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]))
        x = (x + 0.05 * torch.randn(n, 4, generator=torch.Generator().manual_seed(len(split)))).view(n, 1, 2, 2)
        if max_samples is not None:
            x, y = x[:max_samples], y[:max_samples]
        return [{"image": x[i:i + 8], "label": y[i:i + 8]} for i in range(0, len(y), 8)]


class StubModule:
    def __init__(self, recipe: StubRecipe, ema: StubRecipe | None = None):
        self.recipe, self._ema = recipe, ema
        self.device = torch.device("cpu")
        self.logged: dict[str, tuple] = {}

    def eval_recipe(self) -> StubRecipe:
        return self._ema if self._ema is not None else self.recipe

    def log(self, name: str, value, **kwargs) -> None:
        self.logged[name] = (value, kwargs)


def _trainer(epoch: int = 0, dm=None, sanity: bool = False) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, sanity_checking=sanity, datamodule=dm or StubDataModule(),
                           is_global_zero=True, precision="32-true")


def test_logs_the_knn_accuracy_of_the_eval_recipe():
    recipe, ema = StubRecipe(), StubRecipe()
    module = StubModule(recipe, ema)
    dm = StubDataModule()
    KNNMonitor(k=3, max_train_samples=24).on_validation_epoch_end(_trainer(dm=dm), module)
    value, kwargs = module.logged["val/knn_top1"]
    assert torch.is_tensor(value) and 0.0 <= value.item() <= 1.0
    assert value.item() == 1.0                                        # separable
    assert kwargs["sync_dist"] is False and "val/knn_top5" not in module.logged     # 2 classes
    assert ema.calls > 0 and recipe.calls == 0                         # the EMA copy is what is evaluated
    assert ("train", 24, 0) in dm.requests and ("val", None, 0) in dm.requests


def test_falls_back_to_the_recipe_without_eval_recipe():
    recipe = StubRecipe()
    module = SimpleNamespace(recipe=recipe, device=torch.device("cpu"), logged={})
    module.log = lambda name, value, **kw: module.logged.__setitem__(name, value)
    KNNMonitor(k=3).on_validation_epoch_end(_trainer(), module)
    assert recipe.calls > 0 and "val/knn_top1" in module.logged


def test_every_n_epochs_and_auto():
    def logged(monitor: KNNMonitor, epoch: int, pretraining: bool = True, sanity: bool = False) -> bool:
        module = StubModule(StubRecipe(pretraining))
        monitor.on_validation_epoch_end(_trainer(epoch, sanity=sanity), module)
        return "val/knn_top1" in module.logged

    every2 = KNNMonitor(every_n_epochs=2, k=3)
    assert [logged(every2, e) for e in range(4)] == [False, True, False, True]
    assert [logged(every2, e, pretraining=False) for e in range(2)] == [False, True]    # explicit: any recipe
    auto = KNNMonitor(k=3)
    assert logged(auto, 0) and logged(auto, 1)                        # pretraining: every epoch
    assert not logged(auto, 0, pretraining=False)                     # supervised: off
    assert not logged(KNNMonitor(every_n_epochs=0), 0)                # 0: off
    assert not logged(KNNMonitor(every_n_epochs=1), 0, sanity=True)   # never during the sanity check
    with pytest.raises(ValueError, match="every_n_epochs"):
        KNNMonitor(every_n_epochs=-1)


def test_the_model_modes_are_restored():
    recipe = StubRecipe()
    recipe.train()
    recipe.teacher.eval()                                             # a submodule kept in eval mode
    KNNMonitor(k=3).on_validation_epoch_end(_trainer(), StubModule(recipe))
    assert recipe.modes_seen and not any(recipe.modes_seen)           # features were taken in eval mode
    assert recipe.training and recipe.proj.training and not recipe.teacher.training


def test_a_datamodule_without_eval_loader_is_skipped_with_one_warning(caplog):
    monitor, module = KNNMonitor(k=3), StubModule(StubRecipe())
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        for epoch in range(3):
            monitor.on_validation_epoch_end(_trainer(epoch, dm=object()), module)
    assert not module.logged
    assert sum("no eval_loader" in r.getMessage() for r in caplog.records) == 1


def test_autocast_dtype_follows_the_precision():
    assert autocast_dtype("bf16-mixed", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("16-mixed", torch.device("cuda")) is torch.float16
    assert autocast_dtype("32-true", torch.device("cuda")) is None
    assert autocast_dtype("16-mixed", torch.device("cpu")) is None


def test_in_a_real_lightning_run(tiny_fit):
    # a real Trainer: logging from the callback hook reaches callback_metrics (what ModelCheckpoint monitors)
    trainer, _module, _ = tiny_fit(callbacks=[KNNMonitor(every_n_epochs=1, max_train_samples=128)])
    top1 = trainer.callback_metrics["val/knn_top1"]
    assert 0.1 < float(top1) <= 1.0                                   # 10 digit classes: better than chance
    assert "val/knn_top5" in trainer.callback_metrics
    trainer, _, _ = tiny_fit(callbacks=[KNNMonitor()])                # auto + a supervised recipe: off
    assert "val/knn_top1" not in trainer.callback_metrics and "val/top1" in trainer.callback_metrics


def test_history_rows_leave_out_knn_values_not_refreshed_this_epoch(tmp_path):
    """A monitor running every 2nd epoch: the other epochs' rows of history.json have no val/knn_top1 (Lightning
    would otherwise repeat the last value)."""
    import functools
    import json

    import pytorch_lightning as pl

    from vitlab.backbones import vit
    from vitlab.data import Digits
    from vitlab.tasks import ClassificationTask
    from vitlab.lit.callbacks import RunArtifacts
    from vitlab.lit.datamodule import VitlabDataModule
    from vitlab.lit.module import VitlabModule
    from vitlab.lit.probes import KNNMonitor
    from vitlab.optim import build_optimizer
    from vitlab.recipes import Supervised

    pl.seed_everything(0, verbose=False)
    recipe = Supervised(vit("Ti", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16, in_chans=1),
                        ClassificationTask(32, 10))
    module = VitlabModule(recipe, optimizer_factory=functools.partial(build_optimizer, lr=1e-3), config={},
                          data_info={"num_classes": 10, "in_chans": 1})
    dm = VitlabDataModule(Digits(), img_size=16, batch_size=64, augment={"policy": "none"})
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu", use_distributed_sampler=False,
                         callbacks=[KNNMonitor(every_n_epochs=2, max_train_samples=200), RunArtifacts(str(tmp_path))],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    rows = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert [("val/knn_top1" in r) for r in rows] == [False, True, False]
    assert "val/top1" in rows[0] and "val/top1" in rows[2]
