"""KL autoencoders in the latent-diffusion layout (SD-VAE f8d4, VA-VAE / E2E-VAVAE f16d32) as diffusers models.

The f16d32 VAEs of VA-VAE (LightningDiT) and REPA-E put self-attention after every res block
of the lowest-resolution level (16x16) of both encoder and decoder, which the default
diffusers AutoencoderKL lacks. diffusers' own level blocks `AttnDownEncoderBlock2D` /
`AttnUpDecoderBlock2D` (ResnetBlock2D + single-head group-norm Attention, as in the mid
block, + Downsample2D(padding 0) / Upsample2D) compute exactly that, so every layout is an
`AutoencoderKL` whose block types are read off the weights. Latent-diffusion key names are
converted with the explicit map below (level i of the decoder is diffusers' up block n-1-i).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UCGMError
from ..formats.statedict import load_state_dict_strict

# Pieces of latent-diffusion names -> diffusers names.
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
TOP_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
# Attention names of diffusers files written before diffusers 0.14 (e.g. stabilityai/sd-vae-ft-*).
DEPRECATED_ATTN_PARTS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_P = r"\.(weight|bias)$"
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str], int], str | None]]


def _join(*parts: str | None) -> str | None:
    return None if any(p is None for p in parts) else ".".join(parts)  # type: ignore[arg-type]


# (pattern on the latent-diffusion key, diffusers key without the .weight/.bias suffix);
# the int argument is the number of decoder levels (for the reversed up-block index).
LDM_RULES: list[_Rule] = [
    (re.compile(r"^(quant_conv|post_quant_conv)" + _P), lambda m, n: m[1]),
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)" + _P),
     lambda m, n: _join(m[1], TOP_PARTS.get(m[2]))),
    (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)" + _P),
     lambda m, n: _join(m[1], "mid_block.resnets", str(int(m[2]) - 1), RESNET_PARTS.get(m[3]))),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)" + _P),
     lambda m, n: _join(m[1], "mid_block.attentions.0", ATTN_PARTS.get(m[2]))),
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)" + _P),
     lambda m, n: _join("encoder.down_blocks", m[1], "resnets", m[2], RESNET_PARTS.get(m[3]))),
    (re.compile(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)" + _P),
     lambda m, n: _join("encoder.down_blocks", m[1], "attentions", m[2], ATTN_PARTS.get(m[3]))),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv" + _P),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv"),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)" + _P),
     lambda m, n: _join("decoder.up_blocks", str(n - 1 - int(m[1])), "resnets", m[2], RESNET_PARTS.get(m[3]))),
    (re.compile(r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(\w+)" + _P),
     lambda m, n: _join("decoder.up_blocks", str(n - 1 - int(m[1])), "attentions", m[2], ATTN_PARTS.get(m[3]))),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv" + _P),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv"),
]
_ATTN_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_DEPRECATED_ATTN = re.compile(r"^(.+\.attentions\.\d+)\.(query|key|value|proj_attn)" + _P)
_LDM_MARKERS = ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")


def is_ldm_naming(state: Mapping[str, Tensor]) -> bool:
    """True for latent-diffusion key names (encoder.down.i.block.j ...), False for diffusers names."""
    return any(k.startswith(_LDM_MARKERS) for k in state)


def _levels(state: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def ldm_to_diffusers(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename a latent-diffusion VAE state dict to diffusers AutoencoderKL names.

    Attention q/k/v/proj_out are 1x1 convs upstream and Linear layers in diffusers: their
    [C, C, 1, 1] weights become [C, C]. Any key outside the map is an error naming it.
    """
    num_up = _levels(state, "decoder.up.")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = None
        for pattern, rename in LDM_RULES:
            if m := pattern.match(key):
                base = rename(m, num_up)
                new = None if base is None else f"{base}.{m[m.lastindex]}"  # type: ignore[index]
                break
        if new is None:
            unknown.append(key)
            continue
        out[new] = value[:, :, 0, 0] if _ATTN_LINEAR.search(new) and value.ndim == 4 else value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise UCGMError(f"{source}: keys that are not part of a latent-diffusion KL autoencoder: {shown}")
    return out


def diffusers_naming(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state dict in current diffusers AutoencoderKL names, from latent-diffusion or (old) diffusers names."""
    if is_ldm_naming(state):
        return ldm_to_diffusers(state, source)
    out = {}
    for key, value in state.items():
        if m := _DEPRECATED_ATTN.match(key):
            key = f"{m[1]}.{DEPRECATED_ATTN_PARTS[m[2]]}.{m[3]}"
        out[key] = value
    return out


def _shape(state: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise UCGMError(f"{source}: missing VAE tensor {key!r}")
    return tuple(state[key].shape)


def autoencoder_kl_config(state: Mapping[str, Tensor], source: str, norm_groups: int = 32) -> dict[str, Any]:
    """AutoencoderKL constructor arguments read off a diffusers-named state dict.

    Widths, depth, latent channels and which levels carry attention come from the tensors;
    `norm_groups` (GroupNorm groups, 32 in every released VAE) cannot and is passed in.
    """
    levels = _levels(state, "encoder.down_blocks.")
    if levels == 0 or _levels(state, "decoder.up_blocks.") != levels:
        raise UCGMError(f"{source}: expected as many encoder down blocks as decoder up blocks (found "
                        f"{levels} and {_levels(state, 'decoder.up_blocks.')})")
    widths = [_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source)[0] for i in range(levels)]
    layers = _levels(state, "encoder.down_blocks.0.resnets.")
    latent = _shape(state, "decoder.conv_in.weight", source)[1]
    encoder_out = _shape(state, "encoder.conv_out.weight", source)[0]
    if encoder_out != 2 * latent:
        raise UCGMError(f"{source}: encoder.conv_out gives {encoder_out} channels, expected 2 x {latent} latent "
                        "channels (mean and log-variance)")
    for key in ("quant_conv.weight", "post_quant_conv.weight"):
        if key in state and state[key].shape[0] != state[key].shape[1]:
            raise UCGMError(f"{source}: {key} {list(state[key].shape)}: latent width must equal the "
                            "decoder's input width (embed_dim == z_channels)")

    def has_attn(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    return {
        "in_channels": _shape(state, "encoder.conv_in.weight", source)[1],
        "out_channels": _shape(state, "decoder.conv_out.weight", source)[0],
        "down_block_types": [
            "AttnDownEncoderBlock2D" if has_attn(f"encoder.down_blocks.{i}.attentions.") else "DownEncoderBlock2D"
            for i in range(levels)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if has_attn(f"decoder.up_blocks.{i}.attentions.") else "UpDecoderBlock2D"
            for i in range(levels)
        ],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": norm_groups,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": has_attn("encoder.mid_block.attentions."),
    }


def build_autoencoder_kl(
    state: Mapping[str, Tensor], source: str, norm_groups: int = 32, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A diffusers AutoencoderKL holding `state` (latent-diffusion or diffusers names), layout from its shapes."""
    from diffusers import AutoencoderKL  # imported on use: diffusers takes seconds to import

    named = diffusers_naming(state, source)
    config = autoencoder_kl_config(named, source, norm_groups)
    try:
        with torch.device("meta"):
            vae = AutoencoderKL(**config)
    except ValueError as err:  # GroupNorm: groups must divide every width
        raise UCGMError(f"{source}: norm_groups {norm_groups} does not fit widths "
                        f"{config['block_out_channels']}: {err}") from None
    renamed = f"{source} (latent-diffusion keys renamed to diffusers names)" if is_ldm_naming(state) else source
    load_state_dict_strict(vae, {k: v.to(dtype) for k, v in named.items()}, renamed, assign=True)
    return vae
