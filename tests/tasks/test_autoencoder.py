"""The frozen latent autoencoder (vitlab.tasks.diffusion.autoencoder): a tiny diffusers AutoencoderKL and a user factory."""

from __future__ import annotations

import copy
import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from vitlab.tasks.diffusion.autoencoder import (AutoencoderError, AutoencoderNotFoundError, LatentAutoencoder,
                                      autoencoder_geometry, load_autoencoder)

diffusers = pytest.importorskip("diffusers", reason="optional: pip install diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A TINY AutoencoderKL saved like a downloaded one: 2 blocks (downsample 2), 4 latent channels."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1   # [-1, 1]


def test_diffusers_encode_applies_the_config_scale_and_decode_inverts_it(vae_dir):
    ae = load_autoencoder("diffusers", path=str(vae_dir))
    assert (ae.latent_channels, ae.downsample) == (4, 2)
    assert ae.scaling_factor == pytest.approx(0.18215) and ae.shift_factor == 0.0   # config values (shift None -> 0)
    ref = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()              # an independent copy of the weights
    x = _images()
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        raw = ref.encode(x).latent_dist.mode()                                  # (B, 4, 8, 8)
        torch.testing.assert_close(z, raw * 0.18215)
        expected = ref.decode(raw).sample.clamp(-1, 1)
    out = ae.decode(z)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in ae.module.parameters()) and not ae.module.training


def test_explicit_scale_and_shift_and_posterior_sampling(vae_dir):
    ae = load_autoencoder("diffusers", path=str(vae_dir), scaling_factor=0.5, shift_factor=0.1)
    mode = load_autoencoder("diffusers", path=str(vae_dir), scaling_factor=1.0, shift_factor=0.0).encode(_images())
    torch.testing.assert_close(ae.encode(_images()), (mode - 0.1) * 0.5)
    sampled = load_autoencoder("diffusers", path=str(vae_dir), sample_posterior=True)
    a = sampled.encode(_images(), generator=torch.Generator().manual_seed(0))
    b = sampled.encode(_images(), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)                                              # a draw, not the mode
    torch.testing.assert_close(a, sampled.encode(_images(), generator=torch.Generator().manual_seed(0)))


def test_owner_state_dict_excludes_it_and_deepcopy_shares_it(vae_dir):
    owner = nn.Module()
    owner.proj = nn.Linear(2, 2)
    owner.ae = load_autoencoder("diffusers", path=str(vae_dir))
    assert set(owner.state_dict()) == {"proj.weight", "proj.bias"}              # the frozen VAE is never saved
    twin = copy.deepcopy(owner)                                                 # e.g. the EMA copy of a task
    assert twin.ae is owner.ae and twin.proj is not owner.proj
    assert isinstance(owner.ae, LatentAutoencoder) and "ae" not in dict(owner.named_modules())


def test_geometry_reads_only_the_config(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKL", "latent_channels": 16, "block_out_channels": [128, 256, 512, 512]}))
    # no weights file: loading would fail, the geometry does not need them (SD's VAE shape, 16 channels like SD3)
    assert autoencoder_geometry("diffusers", path=str(tmp_path), subfolder="vae") == (16, 8)


def test_missing_folder_and_offline_hub_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(AutoencoderNotFoundError, match="does not exist") as err:
        load_autoencoder("diffusers", path=str(tmp_path / "no_such_vae"))
    assert isinstance(err.value, FileNotFoundError) and "save_pretrained" in str(err.value)
    with pytest.raises(AutoencoderNotFoundError, match="has no config.json in vae"):
        autoencoder_geometry("diffusers", path=str(tmp_path), subfolder="vae")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this model")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(AutoencoderNotFoundError, match="HF_HUB_OFFLINE") as err:
        load_autoencoder("diffusers", path="stabilityai/sd-vae-ft-ema")
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR" in str(err.value)


def test_missing_diffusers_names_the_pip_command(monkeypatch, vae_dir):
    monkeypatch.setitem(sys.modules, "diffusers", None)                          # `import diffusers` fails
    with pytest.raises(ModuleNotFoundError, match="pip install diffusers"):
        load_autoencoder("diffusers", path=str(vae_dir))


FACTORY = '''
import torch.nn.functional as F

class PoolAE:
    """Average-pools by 2 to encode, upsamples to decode; keeps 3 channels."""
    latent_channels = 3
    downsample = 2
    scaling_factor = 2.0

    def encode(self, x):
        return F.avg_pool2d(x, 2)

    def decode(self, z):
        return F.interpolate(z, scale_factor=2, mode="nearest")

class NoGeometry:
    def encode(self, x):
        return x

    def decode(self, z):
        return z

def make(path=None):
    ae = PoolAE()
    ae.path = path
    return ae

def broken():
    return NoGeometry()
'''


def test_python_factory_kind(tmp_path, monkeypatch):
    (tmp_path / "h4_user_ae.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "h4_user_ae", raising=False)
    ae = load_autoencoder("python", target="h4_user_ae:make", path="/weights/here")
    assert ae.module.path == "/weights/here"                                    # path reaches the factory
    assert autoencoder_geometry("python", target="h4_user_ae:make") == (3, 2)
    x = _images()
    z = ae.encode(x)
    torch.testing.assert_close(z, nn.functional.avg_pool2d(x, 2) * 2.0)        # the object's own scaling_factor
    torch.testing.assert_close(ae.decode(z), nn.functional.interpolate(nn.functional.avg_pool2d(x, 2), scale_factor=2))
    with pytest.raises(AutoencoderError, match="lacks latent_channels, downsample"):
        load_autoencoder("python", target="h4_user_ae:broken")
    with pytest.raises(AutoencoderError, match="has no 'nope'"):
        load_autoencoder("python", target="h4_user_ae:nope")
    with pytest.raises(AutoencoderError, match="'pkg.module:factory'"):
        load_autoencoder("python", target="h4_user_ae.make")
    with pytest.raises(AutoencoderError, match="choose diffusers or python"):
        load_autoencoder("onnx", path="x")
