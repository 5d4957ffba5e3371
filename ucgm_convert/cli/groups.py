"""The flag groups the commands share, declared once: model source, architecture overrides, sampling, tuning."""

from __future__ import annotations

from ..hub.upload import PushConfig
from ..jobs.convert import ConvertConfig
from ..jobs.evaluate import EvalConfig, RefConfig
from ..jobs.prepare import PrepareConfig
from ..jobs.sample import SampleConfig
from ..jobs.search import SearchConfig
from ..jobs.source import ArchOverrides, ModelSource, SamplingOverrides, SamplingSweep, TuningOverrides
from ..jobs.tune import TuneConfig
from ..settings import BenchSettings
from .options import Group

SOURCE = Group(ModelSource, flags={"recipe": ("--from",)})
ARCH = Group(ArchOverrides)
SAMPLING = Group(SamplingOverrides, flags={"cfg_scale": ("--cfg-scale", "--cfg")}, note="Default: the recipe's.")
TUNING = Group(TuningOverrides, note="Default: the recipe's tuning value.")

SAMPLE = Group(SampleConfig, sections={"source": SOURCE, "arch": ARCH, "sampling": SAMPLING})
SWEEP = Group(SamplingSweep, flags=SAMPLING.flags, note=SAMPLING.note)  # eval fid: a list of values is a sweep
EVAL = Group(EvalConfig, sections={"source": SOURCE, "arch": ARCH, "sampling": SWEEP})
EVAL_REF = Group(RefConfig, arguments=("source",))
TUNE = Group(TuneConfig, sections={"source": SOURCE, "arch": ARCH, "tuning": TUNING})
PREPARE = Group(PrepareConfig, sections={"source": SOURCE, "arch": ARCH}, arguments=("images",))
CONVERT = Group(ConvertConfig, sections={"arch": ARCH}, arguments=("checkpoint",))
PUSH = Group(PushConfig, flags={"message": ("--message", "-m")}, arguments=("folder",))
BENCH = Group(BenchSettings)
SEARCH = Group(SearchConfig, sections={"source": SOURCE, "arch": ARCH})
