"""A frozen latent autoencoder for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models").

The denoiser trains on ``z = (E(x) - shift) * scale`` instead of pixels: DiT (Peebles & Xie 2023) trains on Stable
Diffusion's VAE latents (8x downsampling, 4 channels) times 0.18215, the factor that gives them ~unit variance.
Two kinds of autoencoder:

- ``"diffusers"``: a diffusers ``AutoencoderKL`` folder (config.json + weights, e.g. ``stabilityai/sd-vae-ft-ema``
  downloaded with ``huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR``) or a hub id when online.
  ``scaling_factor`` / ``shift_factor`` default to the model config's.
- ``"python"``: ``target="pkg.module:factory"``, the user's own factory returning an object with ``encode(x)``,
  ``decode(z)``, ``latent_channels`` and ``downsample``.

:class:`LatentAutoencoder` is deliberately not an nn.Module: assigned to a task it is not registered, so the frozen
weights never enter the task's state_dict / checkpoints, ``copy.deepcopy`` of the task (the EMA copy) shares it,
and it follows the images' device on its own. Weights stay in float32 unless ``to(dtype=...)`` says otherwise (SD
VAEs overflow in fp16: diffusers' ``force_upcast``). Torch only; diffusers is imported lazily.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn

AutoencoderKind = Literal["diffusers", "python"]
KINDS = ("diffusers", "python")
REQUIRED = ("encode", "decode", "latent_channels", "downsample")


class AutoencoderError(ValueError):
    """The latent autoencoder could not be loaded: the message names the fix."""


class AutoencoderNotFoundError(AutoencoderError, FileNotFoundError):
    """The autoencoder folder / hub id is missing or unreachable."""


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ModuleNotFoundError("a latent autoencoder of kind=diffusers needs diffusers: `pip install diffusers` "
                                  "(or `pip install \"vitlab[diffusion]\"`)") from err
    return diffusers


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or deeper than 2."""
    return (path.startswith(("/", "./", "../", "~", "\\")) or Path(path).expanduser().exists()
            or len([p for p in path.replace("\\", "/").split("/") if p]) > 2 or (len(path) > 1 and path[1] == ":"))


def _local_dir(path: str, subfolder: Optional[str]) -> Optional[Path]:
    """The local model folder (with subfolder), None for a hub id; raises when a local-looking path is missing."""
    if not _looks_local(path):
        return None
    root = Path(path).expanduser()
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        what = "does not exist" if not root.exists() else f"has no config.json{' in ' + subfolder if subfolder else ''}"
        raise AutoencoderNotFoundError(
            f"latent autoencoder folder {folder} {what}: set the autoencoder path (task.autoencoder.path) to a "
            f"diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, as written by "
            f"AutoencoderKL.save_pretrained or `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`)"
            f"{'' if subfolder else '; for a full pipeline folder add subfolder=vae'}")
    return folder


def _hub_error(path: str, err: Exception) -> AutoencoderNotFoundError:
    return AutoencoderNotFoundError(
        f"could not load the latent autoencoder {path!r} from the Hugging Face hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Offline (no network, HF_HUB_OFFLINE=1 or "
        f"local_files_only) only models already in the HF cache load: download it where there is network access, "
        f"`huggingface-cli download {path} --local-dir DIR`, and set the autoencoder path to DIR (a local folder "
        f"must exist: {path!r} was read as a hub id because no such folder is there)")


def _import_target(target: str) -> Callable[..., Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AutoencoderError(f"autoencoder target {target!r} must be 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AutoencoderError(f"cannot import {module_name!r} for autoencoder target {target!r} ({err}): "
                               f"put its folder on PYTHONPATH or install the package") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise AutoencoderError(f"{module_name!r} has no {attr!r} (autoencoder target {target!r})") from err


def _build_python(target: Optional[str], path: Optional[str]) -> Any:
    if not target:
        raise AutoencoderError("a latent autoencoder of kind=python needs target='pkg.module:factory'")
    obj = _import_target(target)(**({"path": path} if path is not None else {}))
    missing = [name for name in REQUIRED if not hasattr(obj, name)]
    if missing:
        raise AutoencoderError(f"the object built by {target!r} ({type(obj).__name__}) lacks {', '.join(missing)}: "
                               f"a latent autoencoder needs encode(x) -> latents, decode(z) -> images in [-1, 1] "
                               f"and the attributes latent_channels (int) and downsample (int, H / latent H)")
    return obj


class LatentAutoencoder:
    """A frozen autoencoder mapping [-1, 1] images to scaled latents and back.

    ``encode(x) = (E(x) - shift_factor) * scaling_factor``; ``decode(z) = D(z / scaling_factor + shift_factor)``
    clamped to [-1, 1]. ``E(x)`` is the posterior's mode (``sample_posterior=False``) or a sample from it, when the
    encoder returns a distribution (diffusers' ``latent_dist``). Runs under ``torch.no_grad()``.
    """

    def __init__(self, module: Any, latent_channels: int, downsample: int, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, sample_posterior: bool = False):
        self.module = module
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.sample_posterior = sample_posterior

    def __deepcopy__(self, memo: dict) -> "LatentAutoencoder":
        return self                                        # frozen: the EMA copy of a task shares the weights

    def __repr__(self) -> str:
        return (f"LatentAutoencoder({type(self.module).__name__}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample}, scaling_factor={self.scaling_factor}, "
                f"shift_factor={self.shift_factor})")

    def _param(self) -> Optional[Tensor]:
        if isinstance(self.module, nn.Module):
            return next(self.module.parameters(), None)
        return None

    def _follow(self, x: Tensor) -> Tensor:
        """Moves the weights to x's device (a task's .to() does not reach them) and x to the weights' dtype."""
        p = self._param()
        if p is None:
            return x
        if p.device != x.device:
            self.module.to(x.device)
        return x.to(p.dtype)

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "LatentAutoencoder":
        if hasattr(self.module, "to"):
            self.module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        out = self.module.encode(self._follow(x))          # (B, 3, H, W) in [-1, 1]
        dist = getattr(out, "latent_dist", out)            # diffusers: AutoencoderKLOutput.latent_dist
        if isinstance(dist, Tensor):                       # a plain encoder: the latents themselves
            z = dist
        else:                                              # a posterior (DiagonalGaussianDistribution)
            z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).to(x.dtype)   # (B, c, H/f, W/f)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        out = self.module.decode(self._follow(z) / self.scaling_factor + self.shift_factor)
        images = getattr(out, "sample", out)               # diffusers: DecoderOutput.sample
        return images.clamp(-1, 1).to(z.dtype)             # (B, 3, H, W)


def _diffusers_config(path: str, subfolder: Optional[str]) -> dict:
    folder = _local_dir(path, subfolder)
    if folder is not None:
        return json.loads((folder / "config.json").read_text())
    diffusers = _require_diffusers()
    try:
        return dict(diffusers.AutoencoderKL.load_config(path, subfolder=subfolder))
    except Exception as err:                               # OSError, HF hub errors: offline or unknown id
        raise _hub_error(path, err) from err


def _geometry_from_config(config: dict) -> tuple[int, int]:
    # diffusers' AutoencoderKL defaults: latent_channels 4, block_out_channels (64,); each block but the last halves
    return int(config.get("latent_channels", 4)), 2 ** (len(config.get("block_out_channels", (64,))) - 1)


def load_autoencoder(kind: AutoencoderKind, path: Optional[str] = None, target: Optional[str] = None,
                     subfolder: Optional[str] = None, scaling_factor: Optional[float] = None,
                     shift_factor: Optional[float] = None, sample_posterior: bool = False) -> LatentAutoencoder:
    """Loads a frozen latent autoencoder (see the module docstring for the kinds).

    ``path``: the diffusers folder or hub id (kind=diffusers); passed as ``path=`` to the factory (kind=python)
    when given. ``scaling_factor`` / ``shift_factor``: None = the model's (diffusers config, or the python object's
    attributes of those names, else 1 and 0).
    """
    if kind not in KINDS:
        raise AutoencoderError(f"unknown autoencoder kind {kind!r}; choose {' or '.join(KINDS)}")
    if kind == "python":
        obj = _build_python(target, path)
        scale = getattr(obj, "scaling_factor", 1.0) if scaling_factor is None else scaling_factor
        shift = getattr(obj, "shift_factor", 0.0) if shift_factor is None else shift_factor
        return LatentAutoencoder(obj, obj.latent_channels, obj.downsample, scale, shift or 0.0, sample_posterior)
    if not path:
        raise AutoencoderError("a latent autoencoder of kind=diffusers needs path=DIR (an AutoencoderKL folder) "
                               "or a hub id such as stabilityai/sd-vae-ft-ema")
    diffusers = _require_diffusers()
    folder = _local_dir(path, subfolder)
    try:
        if folder is not None:
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder), low_cpu_mem_usage=False)
        else:
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder=subfolder, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        if folder is not None:
            raise AutoencoderError(f"could not load the AutoencoderKL in {folder}: {err}") from err
        raise _hub_error(path, err) from err
    latent_channels, downsample = _geometry_from_config(dict(vae.config))
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    shift = (getattr(vae.config, "shift_factor", None) or 0.0) if shift_factor is None else shift_factor
    return LatentAutoencoder(vae, latent_channels, downsample, scale, shift, sample_posterior)


def autoencoder_geometry(kind: AutoencoderKind, path: Optional[str] = None, target: Optional[str] = None,
                         subfolder: Optional[str] = None, scaling_factor: Optional[float] = None,
                         shift_factor: Optional[float] = None, sample_posterior: bool = False) -> tuple[int, int]:
    """(latent_channels, downsample) cheaply: diffusers reads only config.json; python builds the object."""
    if kind not in KINDS:
        raise AutoencoderError(f"unknown autoencoder kind {kind!r}; choose {' or '.join(KINDS)}")
    if kind == "python":
        obj = _build_python(target, path)
        return int(obj.latent_channels), int(obj.downsample)
    if not path:
        raise AutoencoderError("a latent autoencoder of kind=diffusers needs path=DIR (an AutoencoderKL folder)")
    return _geometry_from_config(_diffusers_config(path, subfolder))


__all__ = ["AutoencoderError", "AutoencoderKind", "AutoencoderNotFoundError", "LatentAutoencoder",
           "autoencoder_geometry", "load_autoencoder"]
