"""kohya-ss / Automatic1111 LoRA files (Stable Diffusion ``.safetensors``) on diffusers models.

Layout of such a file, one entry per adapted layer (``<name>`` is the module path with ``.``
replaced by ``_``, after a prefix naming the model part):

* ``<prefix>_<name>.lora_down.weight``: ``A``, ``(r, in)`` for a Linear, ``(r, in, kh, kw)``
  for a convolution (LoCon: the layer's own kernel, stride and padding);
* ``<prefix>_<name>.lora_up.weight``: ``B``, ``(out, r)`` or ``(out, r, 1, 1)`` (a 1x1 conv);
* ``<prefix>_<name>.alpha``: a scalar; the scale is ``alpha / r``, and ``alpha = r`` when absent;
* ``<prefix>_<name>.dora_scale`` (LyCORIS DoRA): the magnitude, ``(out, 1, ...)``;
* ``<prefix>_<name>.oft_blocks`` (LyCORIS diag-OFT, kohya OFT) with ``alpha`` (the norm limit)
  and ``rescale``: output-side OFT (:mod:`lora_param.interop.kohya_oft`).
* LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``) entries: :mod:`.kohya_loha`,
  :mod:`.kohya_lokr`.

Prefixes: ``lora_unet`` (the UNet), ``lora_te`` / ``lora_te1`` (the first text encoder),
``lora_te2`` (SDXL's second), ``oft_unet`` (the UNet in files of kohya's OFT trainer). A file
holding several parts is loaded with one call per model, each with its prefix; keys of the other
known prefixes are ignored by that call.

Underscores are ambiguous (module names contain them), so names are resolved against the
model's own modules (``path.replace('.', '_') -> path``). SDXL files use the original
checkpoint's block names (``input_blocks_4_1_...``); they are mapped onto diffusers' module
tree from the UNet's structure, as diffusers does. Text-encoder names with or without the
``text_model_`` wrapper of older transformers both resolve.

Only ``safetensors`` is needed (imported when called); diffusers is not.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.atomic import atomic_write
from ..core.distributed import (
    IMPORT_BEFORE_SHARDING,
    check_in,
    full_tensor,
    is_sharded,
    refuse_sharded,
    write_once,
)
from ..core.entry import AdapterEntry
from ..core.errors import LoRAError
from ..core.freeze import freeze_base
from ..core.inject import Mode, inject
from ..core.lookup import iter_lora, list_adapters
from ..core.paths import check_output_file
from ..core.targets import AdaptTarget, layer_kind, module_targets
from .kohya_codecs import KohyaCodec, codec_for_parts, codec_for_variant, known_families

__all__ = ["KOHYA_PREFIXES", "export_kohya", "import_kohya", "read_kohya_file"]

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2", "oft_unet")
_TEXT_WRAPPER = "text_model_"
_EXTRA_HINT = 'pip install "lora_param[peft]"  (for safetensors)'


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise LoRAError(f"kohya files are safetensors files: {_EXTRA_HINT}.") from None
    return safetensors.torch


def read_kohya_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a ``.safetensors`` LoRA file; a damaged file raises :class:`LoRAError`."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"kohya LoRA file {str(path)!r} does not exist.")
    st = _safetensors_torch()
    try:
        return dict(st.load_file(str(path), device="cpu"))
    except Exception as e:  # safetensors raises its own error type, or OSError/ValueError
        detail = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise LoRAError(
            f"cannot read {str(path)!r}: it is corrupt, truncated, or not a safetensors file "
            f"({type(e).__name__}: {detail})."
        ) from None


def _as_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise LoRAError(f"the state dict holds non-tensor entries: {bad[:5]}.")
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise LoRAError(
            f"import_kohya needs a file path or a state dict, got {type(source).__name__}."
        )
    return read_kohya_file(source)


# --------------------------------------------------------------------------------------------
# names


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, Conv and HF Conv1D layers by path (what kohya files adapt)."""
    return {
        n: m
        for n, m in model.named_modules()
        if ".parametrizations" not in f".{n}"
        and not isinstance(m, AdapterEntry)
        and layer_kind(m) in ("linear", "conv", "conv1d_hf")
    }


def _underscore_map(paths: list[str]) -> tuple[dict[str, str], set[str]]:
    """``path.replace('.', '_') -> path``, and the underscored names two paths share."""
    out: dict[str, str] = {}
    clashes: set[str] = set()
    for path in paths:
        key = path.replace(".", "_")
        if key in out:
            clashes.add(key)
        out[key] = path
    return out, clashes


_RESNET_LEAVES = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_TOP = {
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
}


def _resnet_leaf(rest: str) -> str:
    return _RESNET_LEAVES.get(rest, rest)


def _sgm_to_diffusers(name: str, model: nn.Module) -> str | None:
    """Map an SDXL original-checkpoint name (``input_blocks_4_1_...``) to diffusers' spelling.

    The block layout is read from the UNet itself (``layers_per_block``, which up blocks have
    attentions), so any diffusers ``UNet2DConditionModel`` works. None when not applicable.
    """
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    down = getattr(model, "down_blocks", None)
    up = getattr(model, "up_blocks", None)
    if down is None or up is None or not len(down) or not len(up):
        return None
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        per = len(down[0].resnets) + 1
        block, layer = (i - 1) // per, (i - 1) % per
        if i == 0 or block >= len(down):
            return None
        if layer == per - 1:
            return f"down_blocks_{block}_downsamplers_0_" + ("conv" if rest == "op" else rest)
        part = "resnets" if j == 0 else "attentions"
        leaf = _resnet_leaf(rest) if j == 0 else rest
        return f"down_blocks_{block}_{part}_{layer}_{leaf}"
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", name)
    if m:
        j, rest = int(m[1]), m[2]
        mid = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(j)
        if mid is None:
            return None
        return f"mid_block_{mid}_" + (_resnet_leaf(rest) if j != 1 else rest)
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        per = len(up[0].resnets)
        block, layer = i // per, i % per
        if block >= len(up):
            return None
        has_attention = getattr(up[block], "attentions", None) is not None
        if j == 0:
            return f"up_blocks_{block}_resnets_{layer}_{_resnet_leaf(rest)}"
        if j == 1 and has_attention:
            return f"up_blocks_{block}_attentions_{layer}_{rest}"
        return f"up_blocks_{block}_upsamplers_0_{rest}"
    return None


class _Resolver:
    """Turns the underscored names of a file into the model's module paths."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = _adaptable(model)
        self.names, self.clashes = _underscore_map(list(self.modules))

    def resolve(self, name: str) -> str | None:
        candidates = [name]
        if name.startswith(_TEXT_WRAPPER):
            candidates.append(name[len(_TEXT_WRAPPER) :])
        else:
            candidates.append(_TEXT_WRAPPER + name)
        sgm = _sgm_to_diffusers(name, self.model)
        if sgm is not None:
            candidates.append(sgm)
        for candidate in candidates:
            if candidate in self.clashes:
                raise LoRAError(
                    f"kohya name {name!r} fits several modules of this model "
                    f"({sorted(p for p in self.modules if p.replace('.', '_') == candidate)}); "
                    "the underscore spelling cannot tell them apart."
                )
            if candidate in self.names:
                return self.names[candidate]
        return None


# --------------------------------------------------------------------------------------------
# import


def _split(key: str) -> tuple[str, str]:
    stem, _, suffix = key.partition(".")
    return stem, suffix


def _which_prefix(stem: str) -> str | None:
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return prefix
    return None


def _group(
    state: Mapping[str, Tensor], prefix: str
) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """The parts of each ``prefix`` entry (``{suffix: tensor}`` per stem), and the keys of no
    known prefix."""
    entries: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        stem, suffix = _split(key)
        owner = _which_prefix(stem)
        if owner is None:
            unknown.append(key)
            continue
        if owner != prefix:
            continue  # another part of the pipeline: loaded by the call with its prefix
        entries.setdefault(stem, {})[suffix] = tensor
    return entries, unknown


def import_kohya(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    prefix: str = "lora_unet",
    adapter: str = "default",
    strict: bool = True,
    freeze: bool = True,
    mode: Mode = "factored",
) -> nn.Module:
    """Load a kohya / A1111 LoRA file (LoCon; LyCORIS DoRA, LoHa, LoKr, OFT; kohya OFT).

    Every key is checked against the model before anything changes; on error the model is
    exactly as it was. For a file holding UNet and text-encoder parts, call once per model::

        import_kohya(pipe.unet, "style.safetensors", adapter="style")
        import_kohya(pipe.text_encoder, "style.safetensors", prefix="lora_te", adapter="style")

    Args:
        model: The model the ``prefix`` part of the file belongs to (a diffusers
            ``UNet2DConditionModel``, a ``CLIPTextModel``, any module).
        path_or_state_dict: A ``.safetensors`` file or an already loaded state dict.
        prefix: ``"lora_unet"``, ``"lora_te"``, ``"lora_te1"``, ``"lora_te2"`` or
            ``"oft_unet"`` (kohya's OFT trainer). Keys of the other kohya prefixes are ignored.
        adapter: Name of the new adapter.
        strict: Refuse keys of other methods (LyCORIS IA3, GLoRA, ...), keys of no
            module of the model, and keys of no known prefix. With ``strict=False`` they are
            skipped and listed in a warning.
        freeze: Freeze the base model (every non-adapter parameter).
        mode: Forward mode of the adapter (see :func:`~lora_param.add_lora`).

    Returns:
        The model, with the adapter enabled.

    Raises:
        LoRAError: A damaged file, unknown or unsupported keys (when strict), a shape that
            does not fit, an adapter name already in use, a sharded (FSDP2) model (import
            before ``fully_shard``).
    """
    if not isinstance(model, nn.Module):
        raise LoRAError(f"import_kohya needs an nn.Module, got {type(model).__name__}.")
    refuse_sharded(model, "import_kohya", IMPORT_BEFORE_SHARDING)
    if prefix not in KOHYA_PREFIXES:
        raise LoRAError(f"prefix must be one of {list(KOHYA_PREFIXES)}, got {prefix!r}.")
    if adapter in list_adapters(model):
        raise LoRAError(
            f"adapter {adapter!r} already exists in this model; pass another adapter= name."
        )
    state = _as_state_dict(path_or_state_dict)
    entries, unknown = _group(state, prefix)
    resolver = _Resolver(model)
    plan: list[tuple[AdaptTarget, dict]] = []
    values: list[tuple[str, dict[str, Tensor]]] = []
    no_module: list[str] = []
    foreign: list[str] = []
    for stem, parts in entries.items():
        codec = codec_for_parts(parts)
        if codec is None:
            foreign.extend(f"{stem}.{suffix}" for suffix in parts)
            continue
        path = resolver.resolve(stem[len(prefix) + 1 :])
        if path is None:
            no_module.append(stem)
            continue
        module = resolver.modules[path]
        target = module_targets(path, module)[0]  # type: ignore[index]
        fields, tensors = codec.read(stem, parts, target, module)
        plan.append((target, fields))
        values.append((target.path, tensors))
    problems = []
    if foreign:
        problems.append(
            f"keys of another method or incomplete entries (lora_param reads "
            f"{known_families()}): {sorted(foreign)[:10]}"
        )
    if no_module:
        problems.append(
            f"entries for no Linear/Conv/Conv1D layer of this model: {sorted(no_module)[:10]}"
            f"{' ...' if len(no_module) > 10 else ''}"
        )
    if unknown:
        problems.append(f"keys of no kohya prefix {list(KOHYA_PREFIXES)}: {sorted(unknown)[:10]}")
    if problems and strict:
        raise LoRAError(
            "cannot import the kohya file: "
            + "; ".join(problems)
            + ". Nothing was changed; pass strict=False to load the rest."
        )
    if not plan:
        found = sorted({o for k in state if (o := _which_prefix(_split(k)[0]))})
        raise LoRAError(
            f"the file has no loadable '{prefix}_' entries for this model (prefixes in the "
            f"file: {found}); pass the prefix of this model's part."
        )
    if problems:
        warnings.warn("import_kohya skipped " + "; ".join(problems), stacklevel=2)
    inject(model, plan, adapter=adapter, mode=mode)
    loaded = {tpath: q for tpath, _, _, q in iter_lora(model) if q.adapter == adapter}
    with torch.no_grad():
        for tpath, tensors in values:
            own = loaded[tpath].tensors()
            for name, value in tensors.items():
                own[name].copy_(value.reshape(own[name].shape))
    if freeze:
        freeze_base(model, [], "none")
    return model


# --------------------------------------------------------------------------------------------
# export


def _export_name(model: nn.Module, path: str, prefix: str) -> str:
    name = path.replace(".", "_")
    if prefix.startswith("lora_te") and not hasattr(model, "text_model"):
        top = path.split(".", 1)[0]
        if top in ("embeddings", "encoder", "final_layer_norm"):
            name = _TEXT_WRAPPER + name  # the spelling of real files (older transformers)
    return f"{prefix}_{name}"


def _network_metadata(codecs: list[KohyaCodec]) -> dict[str, str]:
    """``ss_network_module`` (LyCORIS's when any entry is a LyCORIS family) and, for one
    LyCORIS family, ``ss_network_args`` naming its ``algo``."""
    modules = {c.network_module for c in codecs}
    module = "networks.lora" if modules <= {"networks.lora"} else "lycoris.kohya"
    out = {"ss_network_module": module}
    algos = {c.algo for c in codecs}
    if len(algos) == 1 and None not in algos:
        out["ss_network_args"] = json.dumps({"algo": algos.pop()})
    return out


def export_kohya(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "lora_unet",
    adapter: str | None = None,
) -> Path:
    """Write one adapter as a kohya / A1111 ``.safetensors`` file, atomically.

    Keys use the model's module paths with ``.`` replaced by ``_`` (diffusers names for a
    diffusers UNet, which A1111, ComfyUI and diffusers read); text encoders get the
    ``text_model_`` spelling of real files. Convolutions are written LoCon-style. The adapter's
    own ``alpha`` is written (rsLoRA converted exactly to ``alpha * sqrt(r)``); a strength set
    with ``set_adapter_scale`` is not. DoRA adapters add ``dora_scale`` ``(out, 1, ...)``.
    Output-side OFT adapters are written as LyCORIS diag-OFT / kohya OFT entries
    (``oft_blocks``, ``alpha``, ``rescale``; see :mod:`lora_param.interop.kohya_oft`).
    LoHa and LoKr adapters are written with LyCORIS's keys (``ss_network_module``
    ``lycoris.kohya``).

    Args:
        model: A model with adapters on Linear / Conv / HF Conv1D layers.
        path: Where to write.
        prefix: Key prefix for this model part (``"lora_unet"``, ``"lora_te"``, ...).
        adapter: The adapter to write; may be None when the model has exactly one.

    On a sharded (FSDP2) model this is a collective: call it on every rank; the adapter is
    gathered and rank 0 alone writes the file.

    Returns:
        The path written.
    """
    if prefix not in KOHYA_PREFIXES:
        raise LoRAError(f"prefix must be one of {list(KOHYA_PREFIXES)}, got {prefix!r}.")
    names = list_adapters(model)
    if adapter is None:
        if len(names) != 1:
            raise LoRAError(
                f"a kohya file holds one adapter; this model has {names or 'none'}: pass adapter=."
            )
        adapter = names[0]
    elif adapter not in names:
        raise LoRAError(f"no adapter named {adapter!r} in this model; it has {names}.")
    entries = [
        (tpath, module, tensor_name, p)
        for tpath, module, tensor_name, p in iter_lora(model)
        if p.adapter == adapter
    ]
    stems = {}
    codecs: dict[str, KohyaCodec] = {}
    for tpath, module, tensor_name, p in entries:
        codecs[tpath] = codec_for_variant(p, tpath)
        if tensor_name != "weight" or p.kind not in ("linear", "conv", "conv1d_hf"):
            raise LoRAError(
                f"'{tpath}' ({p.kind}) cannot be written as a kohya entry: kohya files adapt "
                "Linear and Conv layers only. Export the others with save_lora or export_peft."
            )
        if p.kind == "conv" and cast(Any, module).groups != 1:
            raise LoRAError(f"'{tpath}' is a grouped convolution; kohya files do not describe it.")
        stems[tpath] = _export_name(model, tpath.rpartition(".")[0], prefix)
    st = _safetensors_torch()
    sharded = any(is_sharded(p.anchor()) for *_, p in entries)
    if sharded:
        check_in("export_kohya")
    else:
        check_output_file(path, "kohya file")
    out: dict[str, Tensor] = {}
    for tpath, _, _, p in entries:
        # Codecs hand back whole tensors (all-gathered when sharded: every rank takes part).
        for suffix, tensor in codecs[tpath].write(p).items():
            out[f"{stems[tpath]}.{suffix}"] = full_tensor(tensor)
    metadata = {**_network_metadata(list(codecs.values())), "lora_param_adapter": adapter}

    def write() -> None:
        check_output_file(path, "kohya file")
        data = st.save(out, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))

    return write_once(path, write, collective=sharded)
