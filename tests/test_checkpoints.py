"""vitlab.checkpoints: what is a vitlab checkpoint, and configs written before a module moved still rebuild their model
(vitlab/heads/ became vitlab/tasks/); DataInfo round-trips through a checkpoint's data_info."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF
from vitlab.checkpoints import NotACheckpointError, is_vitlab_checkpoint, read_checkpoint, upgrade_config
from vitlab.data.base import DataInfo


def test_upgrade_renames_moved_targets_at_any_depth_and_copies():
    old = {"task": {"_target_": "vitlab.heads.ClassificationTask", "top_k": [1, 5]},
           "data": {"source": {"_target_": "vitlab.data.CIFAR"}}, "nested": [{"_target_": "vitlab.heads.x.Y"}]}
    new = upgrade_config(old)
    assert new["task"]["_target_"] == "vitlab.tasks.ClassificationTask" and new["task"]["top_k"] == [1, 5]
    assert new["data"]["source"]["_target_"] == "vitlab.data.CIFAR"
    assert new["nested"][0]["_target_"] == "vitlab.tasks.x.Y"
    assert old["task"]["_target_"] == "vitlab.heads.ClassificationTask"                 # the input is unchanged


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), (b"not a pickle", "cannot be read by torch.load"),
    ({"state_dict": {}}, "holds no resolved vitlab config"),
])
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, needle):
    path = tmp_path / "x.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(NotACheckpointError, match=needle):
        read_checkpoint(path)
    assert not is_vitlab_checkpoint(path)


def test_a_checkpoint_written_with_the_old_layout_still_loads(tmp_path):
    """A checkpoint whose stored config names vitlab.heads.* and whose data_info lacks img_size (both as written
    before the Task contract) is rebuilt by vitlab.load with the same weights and predictions."""
    import vitlab
    from vitlab.lit.build import build_recipe

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
                                          "data.img_size=16", "backbone.patch_size=8"])
    recipe = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1)).eval()
    config = OmegaConf.to_container(cfg, resolve=True)
    config["task"]["_target_"] = "vitlab.heads.ClassificationTask"                  # as older runs stored it
    state = {f"recipe.{k}": v for k, v in recipe.state_dict().items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "vitlab": {"config": config, "data_info": {
        "num_classes": 10, "in_chans": 1, "name": "digits", "task": "classification", "mean": [0.5],
        "std": [0.25]}}}, path)
    assert is_vitlab_checkpoint(path)
    model = vitlab.load(str(path))
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model(x), recipe(x))
    assert model.data_info["img_size"] == 16 and model.data_info["mean"] == [0.5]


def test_data_info_round_trips_and_older_dicts_take_defaults():
    info = DataInfo(num_classes=3, in_chans=3, name="voc", task="detection", img_size=64,
                    class_names=("a", "b", "c"), ignore_index=255, palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    assert DataInfo.from_dict(info.to_dict()) == info
    old = DataInfo.from_dict({"num_classes": 10, "in_chans": 1}, img_size=32)
    assert (old.task, old.img_size, old.class_names, old.mean) == ("classification", 32, None, (0.485, 0.456, 0.406))


def _tiny_checkpoint(tmp_path, target: str = "vitlab.tasks.ClassificationTask"):
    """A vitlab checkpoint of a tiny digits-shaped classifier, written as vitlab-train writes them."""
    from vitlab.lit.build import build_recipe

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
                                          "data.img_size=16", "backbone.patch_size=8"])
    recipe = build_recipe(cfg, DataInfo(num_classes=10, in_chans=1)).eval()
    config = OmegaConf.to_container(cfg, resolve=True)
    config["task"]["_target_"] = target
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"recipe.{k}": v for k, v in recipe.state_dict().items()},
                "vitlab": {"config": config, "data_info": {"num_classes": 10, "in_chans": 1}}}, path)
    return path, recipe


def test_the_old_heads_package_still_resolves_with_a_deprecation_warning():
    """A user's conf/task/*.yaml or a rerun of an old run's .hydra/config.yaml names vitlab.heads.*."""
    from hydra.utils import get_class

    from vitlab.tasks import ClassificationTask

    with pytest.warns(DeprecationWarning, match="vitlab.heads.ClassificationTask is deprecated"):
        assert get_class("vitlab.heads.ClassificationTask") is ClassificationTask
    with pytest.raises(ImportError, match="NoSuchTask"):
        get_class("vitlab.heads.NoSuchTask")


def test_a_vitlab_teacher_wins_over_teacher_model_and_a_missing_file_is_a_file_not_found(tmp_path):
    """Distillation reads a vitlab checkpoint as such even when recipe.teacher_model names a timm model (as before
    the contracts); a missing checkpoint is a FileNotFoundError (as torch.load's was) that names the fix."""
    from vitlab.lit.build import load_model
    from vitlab.recipes.distill import load_teacher

    path, recipe = _tiny_checkpoint(tmp_path)
    teacher = load_teacher(str(path), "resnet18", 10, 1, load_model)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(teacher(x), recipe(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
