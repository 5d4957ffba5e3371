"""`ucgm eval`: `run(EvalConfig)` (sample, features, FID / IS, sharded and resumable) and `run_ref(RefConfig)`."""

from .job import EvalConfig, run
from .reference import RefConfig, RefResult, run_ref

__all__ = ["EvalConfig", "RefConfig", "RefResult", "run", "run_ref"]
