"""Class-conditional diffusion: the task (:mod:`.task`), its objectives (DDPM, rectified flow), samplers (DDIM,
DDPM, Euler with classifier-free guidance), the frozen latent autoencoder and the judge of samples."""

from vitlab.tasks.diffusion.autoencoder import LatentAutoencoder, autoencoder_geometry, load_autoencoder
from vitlab.tasks.diffusion.judge import SampleJudge, load_judge
from vitlab.tasks.diffusion.objectives import GaussianDiffusion, RectifiedFlow, beta_schedule
from vitlab.tasks.diffusion.samplers import ddim_sample, ddpm_sample, euler_sample, guided, sample
from vitlab.tasks.diffusion.task import DiffusionTask

__all__ = ["DiffusionTask", "GaussianDiffusion", "LatentAutoencoder", "RectifiedFlow", "SampleJudge",
           "autoencoder_geometry", "beta_schedule", "ddim_sample", "ddpm_sample", "euler_sample", "guided",
           "load_autoencoder", "load_judge", "sample"]
