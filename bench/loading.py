"""Loading: peak resident memory and time to first sample of a random checkpoint in its upstream container.

For each family (REPA-E's end-to-end container, LightningDiT's train.py container, DDT's Lightning
checkpoint) a random checkpoint of the run's size is written, then each method runs in a fresh
process (peak RSS = VmHWM of /proc/self/status, which counts mmap-ed file pages once touched):

- naive: `torch.load` without mmap, the network built normally (with its weight init), `load_state_dict`;
- ucgm: `uc.load(path)`: mmap-ed `torch.load`, the network built on the meta device, tensors assigned.

Each method then draws its first sample (one forward, batch 1), which touches every weight. "net" is
the peak minus the RSS after imports. Target: ucgm's net peak after the first sample <= 1.2x the file.
Sizes: small = SiT-S-sized networks (about 130 MB files); xl = the released XL/1 sizes (2.5 GB files).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import ucgm_convert as uc
from ucgm_convert.foundation import available_memory
from ucgm_convert.nets import build_network

from .core import Options, Result, in_fresh_process

TITLE = "Loading: peak RSS / file size and time to first sample"
MB = 2**20
NUM_CLASSES = 1000
WIDTH = {"small": (384, 12, 6, 1536), "xl": (1152, 28, 16, 3072)}  # hidden, depth, heads, SwiGLU hidden
FAMILIES = ("repa-e", "lightningdit", "ddt")


def arch_of(family: str, size: str) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """(architecture, constructor arguments, latent shape) of `family`'s network at `size`."""
    hidden, depth, heads, mlp = WIDTH[size]
    if family == "ddt":
        return "ddt", dict(in_channels=4, patch_size=2, hidden_size=hidden, depth=depth,
                           encoder_depth=round(depth * 22 / 28), num_heads=heads, mlp_hidden=mlp,
                           num_classes=NUM_CLASSES), (4, 32, 32)
    common = dict(input_size=16, patch_size=1, in_channels=32, hidden_size=hidden, depth=depth, num_heads=heads,
                  num_classes=NUM_CLASSES)
    if family == "lightningdit":
        return "lightningdit", {**common, "mlp_hidden": mlp}, (32, 16, 16)
    return "sit", common, (32, 16, 16)


def network(family: str, size: str, meta: bool) -> nn.Module:
    """The family's network (upstream key names and shapes), on the meta device if `meta`."""
    arch, kwargs, _ = arch_of(family, size)
    net = build_network(arch, device="meta" if meta else None, **kwargs)
    if not meta and hasattr(net, "initialize_weights"):
        net.initialize_weights()  # upstream's constructors run their weight init
    return net


def random_like(shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, Tensor]:
    """Random float32 tensors ~ N(0, 0.02^2) (norm weights 1) for each name -> shape."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        tensor = torch.empty(shape).normal_(0, 0.02, generator=gen)
        out[key] = tensor.add_(1) if "norm" in key and key.endswith("weight") else tensor
    return out


def container(family: str, size: str, ema: dict[str, Tensor]) -> dict[str, Any]:
    """The family's training checkpoint around the EMA weights; online copies share the EMA's storage."""
    if family == "ddt":
        state = {f"ema_denoiser.{k}": v for k, v in ema.items()}
        state.update({f"denoiser.{k}": v for k, v in ema.items()})
        return {"state_dict": state, "epoch": 0, "global_step": 100000}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(ema)))}]}
    name = "S" if size == "small" else "XL"
    if family == "lightningdit":
        config = {"model": {"model_type": f"LightningDiT-{name}/1", "use_qknorm": False, "use_swiglu": True,
                            "use_rope": True, "use_rmsnorm": True, "wo_shift": False, "in_chans": 32}}
        return {"model": dict(ema), "ema": ema, "opt": optimizer, "config": config}
    ema["bn.running_mean"], ema["bn.running_var"] = torch.zeros(32), torch.ones(32)
    ema["bn.num_batches_tracked"] = torch.tensor(1000)
    args = argparse.Namespace(model=f"SiT-{name}/1", vae="f16d32", encoder_depth=8, cfg_prob=0.1, resolution=256,
                              num_classes=NUM_CLASSES, proj_coeff=0.5)
    vae = random_like({"encoder.conv_in.weight": torch.Size([128, 3, 3, 3]),
                       "decoder.conv_out.weight": torch.Size([3, 128, 3, 3])}, seed=2)  # a small stand-in
    return {"model": dict(ema), "ema": ema, "vae": vae, "discriminator": {}, "opt": optimizer, "opt_vae": optimizer,
            "opt_disc": optimizer, "args": args, "steps": 400000}


def write_checkpoint(family: str, size: str, path: Path) -> None:
    """Random weights with the network's key names and shapes, saved in the upstream container."""
    state = network(family, size, meta=True).state_dict()
    ema = random_like({k: v.shape for k, v in state.items()})
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):  # fixed tables: any values load
        if key in ema:
            ema[key] = ema[key].zero_()
    torch.save(container(family, size, ema), path)


def _status_mib(*fields: str) -> dict[str, float]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) / 1024
    return values


def _load(method: str, family: str, size: str, path: Path) -> nn.Module:
    if method == "naive":
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if family == "ddt":
            weights = {k[len("ema_denoiser."):]: v for k, v in obj["state_dict"].items() if k.startswith("ema_")}
        else:
            weights = {k: v for k, v in obj["ema"].items() if not k.startswith(("projectors.", "bn."))}
        net = network(family, size, meta=False)
        net.load_state_dict(weights, strict=True)
        del obj, weights
        return net.eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningDiT without latents_stats.pt
        return uc.load(path)


def measure(method: str, family: str, size: str, path: Path) -> dict[str, float]:
    """In a fresh process: load with `method`, then one forward; RSS (MiB) and seconds after each."""
    torch.set_num_threads(1)
    start = _status_mib("VmRSS")["VmRSS"]
    t0 = time.perf_counter()
    net = _load(method, family, size, path)
    result = {"load_s": time.perf_counter() - t0, "start": start, "load_peak": _status_mib("VmHWM")["VmHWM"]}
    x = torch.randn(1, *arch_of(family, size)[2])
    with torch.inference_mode():
        net(x, torch.tensor([0.5]), torch.tensor([1]))
    result["first_sample_s"] = time.perf_counter() - t0
    result.update({f"sample_{k}": v for k, v in _status_mib("VmHWM", "RssAnon", "RssFile").items()})
    return result


def _write(family: str, size: str, path: Path) -> int:
    write_checkpoint(family, size, path)
    return path.stat().st_size


def _row(family: str, method: str, file_mib: float, r: dict[str, float]) -> list[Any]:
    net_load, net_sample = r["load_peak"] - r["start"], r["sample_VmHWM"] - r["start"]
    return [family, method, f"{file_mib:.0f}", f"{r['load_s']:.2f}", f"{r['first_sample_s']:.2f}",
            f"{net_load / file_mib:.2f}", f"{net_sample / file_mib:.2f}",
            f"{r['sample_RssAnon']:.0f} / {r['sample_RssFile']:.0f}"]


def run(opts: Options) -> Result:
    families = FAMILIES[:1] if opts.quick else FAMILIES
    rows, data, notes = [], {}, []
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-load-") as tmp:
        for family in families:
            path = Path(tmp) / f"{family}-{opts.size}.pt"
            need = 4 * sum(p.numel() for p in network(family, opts.size, meta=True).state_dict().values())
            if 3 * need > available_memory():
                notes.append(f"{family}: skipped, needs about {3 * need / 2**30:.1f} GiB of memory")
                continue
            file_mib = in_fresh_process(_write, family, opts.size, path) / MB
            for method in ("naive", "ucgm"):
                r = in_fresh_process(measure, method, family, opts.size, path)
                rows.append(_row(family, method, file_mib, r))
                data[f"{family} | {method}"] = {**r, "file_mib": file_mib}
            path.unlink()
            ucgm = data[f"{family} | ucgm"]
            notes.append(f"{family}: ucgm net peak after the first sample = "
                         f"{(ucgm['sample_VmHWM'] - ucgm['start']) / file_mib:.2f}x the file (target <= 1.2)")
    columns = ["family", "method", "file MiB", "load s", "first sample s", "net peak / file (load)",
               "net peak / file (after sample)", "anon / file-backed MiB"]
    return Result("loading", TITLE, columns, rows, notes, data=data)
