"""vitlab: config-driven training and evaluation of vision transformers."""

__version__ = "0.1.0"


def load(path: str, map_location: str = "cpu"):
    """Rebuild a trained model from a vitlab checkpoint alone (the resolved config is inside it).

    Returns the LightningModule in eval mode; ``model(images)`` gives logits.
    """
    from vitlab.lit.build import load_checkpoint

    return load_checkpoint(path, map_location=map_location)
