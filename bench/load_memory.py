"""Peak memory of loading a full-size checkpoint: naive torch.load + load_state_dict vs `uc.load`.

Writes a random checkpoint of a released size in its upstream container (REPA-E: SiT-XL/1 on
32x16x16 latents in train_repae.py's end-to-end container, ~675M parameters, ~2.7 GB float32;
LightningDiT: LightningDiT-XL/1 in train.py's container), then measures each method in a fresh
subprocess (peak RSS = VmHWM of /proc/self/status, which also counts mmap-ed file pages once
touched):
  naive  torch.load without mmap, build the network normally (with its weight init), load_state_dict (copy);
  ucgm   uc.load(path): mmap-ed torch.load, network built on the meta device, tensors assigned.
Each method then runs one forward pass (batch 1), which touches every weight.

    python bench/load_memory.py [--family repa-e|lightningdit] [--dir /tmp] [--keep] [--no-forward]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

GB = 1024**3
LATENT = (32, 16, 16)  # f16d32 latents of 256x256 images
NUM_CLASSES = 1000
# Released XL sizes; REPA-E's SiT-XL/1 also has the REPA projector (encoder_depth 8, DINOv2-B z_dim 768).
SIT_XL1 = dict(input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
               num_classes=NUM_CLASSES, qk_norm=False)
LIGHTNINGDIT_XL1 = dict(input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                        mlp_hidden=3072, num_classes=NUM_CLASSES, use_qknorm=False, use_swiglu=True, use_rope=True,
                        use_rmsnorm=True, wo_shift=False, learn_sigma=False)
PROJECTOR_DIM, Z_DIM = 2048, 768


def network(family: str, meta: bool) -> nn.Module:
    """The family's XL network (our class, upstream's key names and shapes), on the meta device if `meta`."""
    from ucgm_convert.nets.lightningdit import LightningDiT
    from ucgm_convert.nets.sit import SiT

    cls, kwargs = (SiT, SIT_XL1) if family == "repa-e" else (LightningDiT, LIGHTNINGDIT_XL1)
    if meta:
        with torch.device("meta"):
            return cls(**kwargs)
    net = cls(**kwargs)
    if hasattr(net, "initialize_weights"):
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


def repa_e_container(ema: dict[str, Tensor]) -> dict[str, Any]:
    """train_repae.py's checkpoint: `model` shares the EMA's storage (stored once), small `vae` stand-in."""
    hidden, channels = SIT_XL1["hidden_size"], SIT_XL1["in_channels"]
    extra = random_like({
        "projectors.0.0.weight": torch.Size([PROJECTOR_DIM, hidden]),
        "projectors.0.0.bias": torch.Size([PROJECTOR_DIM]),
        "projectors.0.2.weight": torch.Size([PROJECTOR_DIM, PROJECTOR_DIM]),
        "projectors.0.2.bias": torch.Size([PROJECTOR_DIM]),
        "projectors.0.4.weight": torch.Size([Z_DIM, PROJECTOR_DIM]), "projectors.0.4.bias": torch.Size([Z_DIM]),
    }, seed=1)
    ema.update(extra)
    ema["bn.running_mean"] = torch.zeros(channels)
    ema["bn.running_var"] = torch.ones(channels)
    ema["bn.num_batches_tracked"] = torch.tensor(1000)
    vae = random_like({"encoder.conv_in.weight": torch.Size([128, 3, 3, 3]),
                       "decoder.conv_out.weight": torch.Size([3, 128, 3, 3])}, seed=2)
    args = argparse.Namespace(model="SiT-XL/1", vae="f16d32", encoder_depth=8, cfg_prob=0.1, resolution=256,
                              num_classes=NUM_CLASSES, proj_coeff=0.5)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(ema)))}]}
    return {"model": dict(ema), "ema": ema, "vae": vae, "discriminator": {}, "opt": optimizer, "opt_vae": optimizer,
            "opt_disc": optimizer, "args": args, "steps": 400000}


def lightningdit_container(ema: dict[str, Tensor]) -> dict[str, Any]:
    """train.py's checkpoint {"model", "ema", "opt", "config"}; `model` shares the EMA's storage."""
    config = {"model": {"model_type": "LightningDiT-XL/1", "use_qknorm": False, "use_swiglu": True, "use_rope": True,
                        "use_rmsnorm": True, "wo_shift": False, "in_chans": 32}}
    optimizer = {"state": {}, "param_groups": [{"lr": 2e-4, "params": list(range(len(ema)))}]}
    return {"model": dict(ema), "ema": ema, "opt": optimizer, "config": config}


def write_checkpoint(family: str, path: Path) -> None:
    """Random weights with the XL network's key names and shapes, saved in the upstream container."""
    net = network(family, meta=True)
    state = net.state_dict()
    ema = random_like({k: v.shape for k, v in state.items()})
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):  # fixed tables: any values load
        if key in state:
            ema[key] = ema[key].zero_()
    container = repa_e_container(ema) if family == "repa-e" else lightningdit_container(ema)
    torch.save(container, path)


def status_gb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (kB) in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0]) * 1024 / GB
    return values


def measure(method: str, family: str, path: Path, forward: bool) -> dict[str, float]:
    """Load `path` with `method` in this (fresh) process; peak / anonymous / file-backed RSS after each phase."""
    import ucgm_convert as uc

    start_rss = status_gb("VmRSS")["VmRSS"]
    t0 = time.perf_counter()
    if method == "naive":
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in obj["ema"].items() if not k.startswith(("projectors.", "bn."))}
        net = network(family, meta=False)
        net.load_state_dict(state, strict=True)
        del obj, state
        net.eval().requires_grad_(False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningDiT without latents_stats.pt
            net = uc.load(path)
    result = {"load_s": time.perf_counter() - t0, "start_rss": start_rss}
    result.update({f"load_{k}": v for k, v in status_gb("VmHWM", "RssAnon", "RssFile").items()})
    if forward:
        x = torch.randn(1, *LATENT)
        t0 = time.perf_counter()
        with torch.no_grad():
            net(x, torch.tensor([0.5]), torch.tensor([1]))
        result["forward_s"] = time.perf_counter() - t0
        result.update({f"forward_{k}": v for k, v in status_gb("VmHWM", "RssAnon", "RssFile").items()})
    return result


def weights_gb(family: str) -> float:
    """Size of the network's float32 weights (what a loaded model must hold)."""
    return sum(v.numel() * 4 for v in network(family, meta=True).state_dict().values()) / GB


def run_child(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return done.stdout


def table(family: str, weights: float, file_gb: float, results: dict[str, dict[str, float]], forward: bool) -> str:
    """Markdown table; "net" = peak RSS minus the RSS after imports (what loading itself added)."""
    base = results["naive"]["load_VmHWM"]
    head = "| method | load s | peak RSS GB | x naive | net GB | net x weights |"
    rule = "|---|---|---|---|---|---|"
    if forward:
        head += " after forward: peak RSS GB | anon / file-backed GB | forward s |"
        rule += "---|---|---|"
    rows = [f"{family}: network weights {weights:.2f} GB float32, file {file_gb:.2f} GB", head, rule]
    for method, r in results.items():
        net = r["load_VmHWM"] - r["start_rss"]
        row = (f"| {method} | {r['load_s']:.1f} | {r['load_VmHWM']:.2f} | {r['load_VmHWM'] / base:.2f} | "
               f"{net:.2f} | {net / weights:.2f} |")
        if forward:
            row += (f" {r['forward_VmHWM']:.2f} | {r['forward_RssAnon']:.2f} / {r['forward_RssFile']:.2f} | "
                    f"{r['forward_s']:.1f} |")
        rows.append(row)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("repa-e", "lightningdit"), default="repa-e")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write the checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint (reused when present)")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward pass")
    args = parser.parse_args()

    weights = weights_gb(args.family)
    path = args.dir / f"ucgm-bench-{args.family}-xl1.pt"
    if not path.is_file():
        needed = 1.2 * weights * GB
        free = shutil.disk_usage(args.dir).free
        if free < needed:
            sys.exit(f"{args.dir}: {free / GB:.1f} GB free, the checkpoint needs about {needed / GB:.1f} GB; use --dir")
        t0 = time.perf_counter()
        run_child("_write", args.family, str(path))
        print(f"wrote {path} ({path.stat().st_size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        results = {}
        for method in ("naive", "ucgm"):
            results[method] = json.loads(run_child("_measure", method, args.family, str(path), str(int(args.forward))))
            print(f"measured {method}", flush=True)
        print(table(args.family, weights, path.stat().st_size / GB, results, args.forward))
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_write":
        write_checkpoint(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], Path(sys.argv[4]), forward=sys.argv[5] == "1")))
    else:
        main()
