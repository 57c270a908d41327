"""Metrics for generated images: sample accuracy under a classifier, FID and KID (torchmetrics).

- ``sample_acc``: the accuracy of class-conditional samples under a classifier trained on the real data (the
  "classification accuracy score" idea of Ravuri & Vinyals 2019, used the other way round: does the generator
  draw the class it was asked for?). Needs no download, so it works offline.
- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium")
  and KID (Binkowski et al. 2018, "Demystifying MMD GANs") through torchmetrics, in the feature space of
  torch-fidelity's Inception-v3 (``features="inception"``: the numbers papers quote, e.g. DiT's FID-50K) or of a
  classifier of ours (``features="classifier"``: computable offline, but NOT comparable with Inception FID).

Every number is a torchmetrics state, so under DDP ``compute()`` syncs the counts / feature statistics of all
ranks. The feature extractor (Inception or the classifier) is held outside nn.Module registration: it is never
saved in a task's checkpoint, never duplicated by ``copy.deepcopy`` (the EMA copy of a task shares it), and is
computed once per batch for both FID and KID (torchmetrics receives the features through an identity module).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassStatScores
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger("vitlab")

Features = Literal["inception", "classifier"]
FEATURES = ("inception", "classifier")
FID_KEYS = ("features", "inception_weights", "kid_subset_size", "kid_subsets")

# torch-fidelity's Inception-v3 (the TF FID network ported to PyTorch); read from torch_fidelity when installed
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FEATURES = 2048          # the pool3 features FID is defined on


class MissingInceptionWeightsError(FileNotFoundError):
    """FID / KID with Inception features was asked for, but the weights file is not on disk (offline machine)."""


class NotEnoughSamplesError(ValueError):
    """FID / KID was computed from fewer than 2 images on one side."""


def _inception_url() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        return URL_INCEPTION_V3
    except (ImportError, AttributeError):
        return INCEPTION_URL


def check_fid_setup(fid: Optional[dict]) -> Optional[Path]:
    """Before any work: FID / KID with Inception features need torch-fidelity and the weights file; returns the
    weights' path (None for other features or no FID). Raises the errors of :func:`resolve_inception_weights`."""
    if not fid or fid.get("features", "inception") != "inception":
        return None
    weights = resolve_inception_weights(fid.get("inception_weights"))
    _require_torch_fidelity()
    return weights


def resolve_inception_weights(inception_weights: Optional[str] = None) -> Path:
    """The Inception-v3 weights file FID will load, checked to exist; never downloads.

    ``inception_weights`` if given, else torch-fidelity's file name in ``torch.hub.get_dir()/checkpoints/`` (where
    torch-fidelity itself caches it when online). Raises :class:`MissingInceptionWeightsError` saying where to
    download it and which key to set.
    """
    url = _inception_url()
    name = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    path = Path(inception_weights).expanduser() if inception_weights else cached
    if not path.is_file():
        where = ("task.fid.inception_weights points at a missing file" if inception_weights
                 else "it is not in torch's hub cache")
        raise MissingInceptionWeightsError(
            f"FID/KID with task.fid.features=inception needs torch-fidelity's Inception-v3 weights ({name}), but "
            f"{where}: {path}. vitlab never downloads them during a run. Download the file where there is network "
            f"access: {url} (e.g. `wget {url}`), then set task.fid.inception_weights=PATH or copy it to "
            f"{cached}. Offline alternatives: task.fid.features=classifier "
            f"(FID in a classifier's feature space, not comparable with Inception FID) or task.fid=null.")
    return path


def _require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError(
            "FID/KID with task.fid.features=inception needs torch-fidelity (the Inception-v3 FID network): "
            "`pip install torch-fidelity` (or `pip install \"vitlab[diffusion]\"`), or use "
            "task.fid.features=classifier / task.fid=null.") from err


class _Frozen:
    """Holds a frozen callable (an nn.Module or a function) out of nn.Module registration: not in state_dict, not
    moved by ``.to()`` of the owner (moved lazily to the images' device instead), shared by ``copy.deepcopy``."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn
        if isinstance(fn, nn.Module):
            fn.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        return self

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        if isinstance(self.fn, nn.Module):
            p = next(self.fn.parameters(), None)
            if p is not None and p.device != x.device:
                self.fn.to(x.device)
        # full precision: FID's covariances are ill-conditioned in bf16 (torchmetrics also recommends float64 states)
        with torch.autocast(x.device.type, enabled=False):
            return self.fn(x)


class _LazyInception:
    """Builds the Inception feature network on its first call (the weights are resolved then, not when a task is
    built), then behaves as :class:`_Frozen` around it; shared by ``copy.deepcopy``."""

    def __init__(self, inception_weights: Optional[str]):
        self.inception_weights = inception_weights
        self.frozen: Optional[_Frozen] = None

    def __deepcopy__(self, memo: dict) -> "_LazyInception":
        return self

    def __call__(self, x: Tensor) -> Tensor:
        if self.frozen is None:
            weights = check_fid_setup({"features": "inception", "inception_weights": self.inception_weights})
            self.frozen = _Frozen(_InceptionFeatures(weights))
        return self.frozen(x)


class _InceptionFeatures(nn.Module):
    """[0, 1] float images (B, 1|3, H, W) -> Inception pool3 features (B, 2048) float32.

    Grey images are repeated to 3 channels; pixels are rounded to uint8 (what torch-fidelity expects, as if the
    samples were saved as PNGs); torchmetrics' ``NoTrainInceptionV3`` resizes to 299 x 299.
    """

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # torchmetrics passes feature_extractor_weights_path on to torch-fidelity, which then torch.load()s it
        # instead of downloading (KernelInceptionDistance(feature=2048) does not forward it in torchmetrics 1.9,
        # one more reason to build the network once here and share it between FID and KID)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                      feature_extractor_weights_path=str(weights))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)                         # (B, 3, H, W)
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(images).float()                                   # (B, 2048)


class _PrecomputedFeatures(nn.Module):
    """The "feature extractor" torchmetrics gets: the features are computed once by GenerativeMetrics and passed
    in place of images (a custom module makes torchmetrics skip its uint8 conversion whatever ``normalize``)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features                                 # read by FID: no dummy forward

    def forward(self, features: Tensor) -> Tensor:
        return features                                                  # (B, D)


class _FID(FrechetInceptionDistance):
    """FID whose sample-count check names the fix (torchmetrics raises a bare RuntimeError)."""

    def compute(self) -> Tensor:                                         # runs on the states synced across ranks
        real, fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if real < 2 or fake < 2:
            raise NotEnoughSamplesError(
                f"FID needs at least 2 images on each side, got {real} real and {fake} generated: evaluate on more "
                f"samples (real images come from the validation batches, generated ones from the task's sampling).")
        return super().compute()


def _rows(state: Any) -> int:
    """Images in a list-of-features state (a list of (b, D) tensors, or one tensor after a sync)."""
    return dim_zero_cat(state).shape[0] if not isinstance(state, list) or state else 0


class _KID(KernelInceptionDistance):
    """KID that clamps its subset size to the number of images (with a warning) instead of crashing."""

    def compute(self) -> tuple[Tensor, Tensor]:
        n = min(_rows(self.real_features), _rows(self.fake_features))
        if n < 2:
            raise NotEnoughSamplesError(
                f"KID needs at least 2 images on each side, got {n} on the smaller one: evaluate on more samples.")
        requested = self.subset_size
        if n < requested:
            log.warning("KID subset size %d > %d images on the smaller side: using subsets of %d "
                        "(set task.fid.kid_subset_size <= the number of evaluated samples)", requested, n, n)
            self.subset_size = n
        try:
            return super().compute()
        finally:
            self.subset_size = requested


def _key(name: str) -> str:
    return "_".join(str(name).replace("/", " ").split())             # a loggable key: no spaces, no "/"


class GenerativeMetrics(nn.Module):
    """Sample accuracy under a classifier, FID and KID of generated images; a container of torchmetrics.

    Args:
        num_classes: classes of the conditional generator (the labels passed to :meth:`update`).
        class_names: names for the per-class keys ``sample_acc_<name>`` (else ``sample_acc_<index>``).
        classifier: images in [0, 1] (B, C, H, W) -> logits (B, num_classes), trained on the real data. None: no
            sample accuracy. Kept out of this module's state_dict (rebuilt from its own checkpoint).
        fid: None (no FID / KID) or ``{"features": "inception" | "classifier", "inception_weights": PATH | None,
            "kid_subset_size": int (1000), "kid_subsets": int (100)}``. ``features="inception"`` is the standard FID
            and needs torch-fidelity plus its weights file on disk (checked here, before any training; see
            :func:`resolve_inception_weights`). ``features="classifier"`` uses ``classifier_features``: offline, but
            its numbers are NOT comparable with Inception FID nor across different classifiers.
        classifier_features: images in [0, 1] (B, C, H, W), C as in the data -> features (B, D); for
            ``features="classifier"``. Called in float32 without autocast; its FID / KID states are built at the
            first update (when D is known).

    :meth:`update` takes ``preds={"samples": (B, C, H, W) in [0, 1], "real": (B', C, H, W) in [0, 1] or None}`` and
    ``target`` = the labels the samples were generated for (None for an unconditional generator). :meth:`compute`
    returns ``sample_acc`` (micro), ``sample_acc_<class>`` for every class that has samples (classes without
    samples are left out, not reported as 0), ``samples`` (count), ``fid``, ``kid_mean``, ``kid_std``.
    """

    def __init__(self, num_classes: int, class_names: Optional[list[str]] = None,
                 classifier: Optional[Callable[[Tensor], Tensor]] = None, fid: Optional[dict] = None,
                 classifier_features: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes: pass one name per class")
        self.num_classes = num_classes
        self.class_names = [_key(n) for n in class_names] if class_names is not None else None
        self._classifier = _Frozen(classifier) if classifier is not None else None
        self.count = SumMetric()
        self.stats = (MulticlassStatScores(num_classes, average=None)  # (C, 5): tp, fp, tn, fn, support
                      if classifier is not None and num_classes >= 2 else None)
        if classifier is not None and num_classes < 2:
            raise ValueError(f"sample accuracy needs a class-conditional generator with >= 2 classes, got "
                             f"num_classes={num_classes}: drop the classifier for an unconditional model")

        self.fid: Optional[_FID] = None
        self.kid: Optional[_KID] = None
        self._features: Optional[_Frozen] = None
        if fid is not None:
            fid = dict(fid)
            unknown = sorted(set(fid) - set(FID_KEYS))
            if unknown:
                raise ValueError(f"unknown task.fid keys {unknown}; valid: {', '.join(FID_KEYS)}")
            features = fid.get("features", "inception")
            if features not in FEATURES:
                raise ValueError(f"task.fid.features={features!r}; choose {' or '.join(FEATURES)}")
            self.kid_subset_size = int(fid.get("kid_subset_size") or 1000)
            self.kid_subsets = int(fid.get("kid_subsets") or 100)
            if self.kid_subset_size < 2 or self.kid_subsets < 1:
                raise ValueError(f"task.fid.kid_subset_size must be >= 2 and kid_subsets >= 1, got "
                                 f"{self.kid_subset_size} and {self.kid_subsets}")
            if features == "inception":
                # resolved at the first update: loading a checkpoint to sample from it never needs the weights
                # (vitlab-train checks them before training with check_fid_setup)
                self._features = _LazyInception(fid.get("inception_weights"))
                self._build_distances(INCEPTION_FEATURES)
            else:
                if classifier_features is None:
                    raise ValueError("task.fid.features=classifier needs classifier_features (images -> (B, D) "
                                     "features of a classifier trained on the real data); or use features=inception")
                self._features = _Frozen(classifier_features)

    def _build_distances(self, num_features: int) -> None:
        with warnings.catch_warnings():                                   # KID's "stores all features" notice
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.fid = _FID(feature=_PrecomputedFeatures(num_features))
            self.kid = _KID(feature=_PrecomputedFeatures(num_features), subsets=self.kid_subsets,
                            subset_size=self.kid_subset_size)

    @torch.no_grad()
    def update(self, preds: dict[str, Any], target: Optional[Tensor]) -> None:
        samples = preds["samples"]                                        # (B, C, H, W) in [0, 1]
        real = preds.get("real")                                          # (B', C, H, W) in [0, 1] or None
        self.count.update(float(samples.shape[0]))
        if self.stats is not None and target is not None:
            logits = self._classifier(samples.float())                    # (B, num_classes)
            self.stats.update(logits.argmax(dim=1), target.to(logits.device).long())
        if self._features is None:
            return
        for images, is_real in ((samples, False), (real, True)):
            if images is None:
                continue
            feats = self._features(images.float()).float()                # (B, D)
            if feats.dim() != 2 or feats.shape[0] != images.shape[0]:
                raise ValueError(f"classifier_features must return (B, D) features, got {tuple(feats.shape)} "
                                 f"for {images.shape[0]} images")
            if self.fid is None:                                          # features=classifier: D known now
                self._build_distances(feats.shape[1])
                self.fid.to(feats.device)
                self.kid.to(feats.device)
            self.fid.update(feats, real=is_real)
            self.kid.update(feats, real=is_real)

    def compute(self) -> dict[str, Tensor]:
        # every rank computes every metric (each compute is a collective under DDP), updated locally or not
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            out: dict[str, Tensor] = {"samples": self.count.compute().round().long()}
            stats = self.stats.compute() if self.stats is not None else None   # (C, 5), summed over ranks
        if stats is not None:
            tp, support = stats[:, 0], stats[:, 4]
            if int(support.sum()) > 0:
                out["sample_acc"] = tp.sum().float() / support.sum()
                for c in torch.nonzero(support > 0).flatten().tolist():   # classes without samples: left out
                    name = self.class_names[c] if self.class_names is not None else str(c)
                    out[f"sample_acc_{name}"] = tp[c].float() / support[c]
        if self._features is not None:
            if self.fid is None:
                raise NotEnoughSamplesError("FID/KID computed before any images were seen: call update() with "
                                            "generated and real images first")
            out["fid"] = self.fid.compute()
            out["kid_mean"], out["kid_std"] = self.kid.compute()
        return out

    def reset(self) -> None:
        for metric in (self.count, self.stats, self.fid, self.kid):
            if metric is not None:
                metric.reset()
