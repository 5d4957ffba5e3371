"""`ucgm prepare-data`: images -> sharded, resumable VAE latents for `ucgm tune --data`."""

from .job import PrepareConfig, PrepareResult, run

__all__ = ["PrepareConfig", "PrepareResult", "run"]
