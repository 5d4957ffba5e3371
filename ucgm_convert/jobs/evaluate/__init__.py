"""`ucgm eval`: `run(EvalConfig)` (sample, features, the table's metrics, sharded and resumable; a sweep when a
sampling field lists several values) and `run_ref(RefConfig)`."""

from .job import EvalConfig, run_one
from .reference import RefConfig, RefResult, run_ref
from .sweep import run

__all__ = ["EvalConfig", "RefConfig", "RefResult", "run", "run_one", "run_ref"]
