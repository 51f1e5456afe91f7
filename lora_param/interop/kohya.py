"""kohya-ss / Automatic1111 LoRA files (Stable Diffusion ``.safetensors``) on diffusers models.

Layout of such a file, one entry per adapted layer (``<name>`` is the module path with ``.``
replaced by ``_``, after a prefix naming the model part):

* ``<prefix>_<name>.lora_down.weight``: ``A``, ``(r, in)`` for a Linear, ``(r, in, kh, kw)``
  for a convolution (LoCon: the layer's own kernel, stride and padding);
* ``<prefix>_<name>.lora_up.weight``: ``B``, ``(out, r)`` or ``(out, r, 1, 1)`` (a 1x1 conv);
* ``<prefix>_<name>.alpha``: a scalar; the scale is ``alpha / r``, and ``alpha = r`` when absent;
* ``<prefix>_<name>.dora_scale`` (LyCORIS DoRA): the magnitude, ``(out, 1, ...)``.

Prefixes: ``lora_unet`` (the UNet), ``lora_te`` / ``lora_te1`` (the first text encoder),
``lora_te2`` (SDXL's second). A file holding several parts is loaded with one call per model,
each with its prefix; keys of the other known prefixes are ignored by that call.

Underscores are ambiguous (module names contain them), so names are resolved against the
model's own modules (``path.replace('.', '_') -> path``). SDXL files use the original
checkpoint's block names (``input_blocks_4_1_...``); they are mapped onto diffusers' module
tree from the UNet's structure, as diffusers does. Text-encoder names with or without the
``text_model_`` wrapper of older transformers both resolve.

Only ``safetensors`` is needed (imported when called); diffusers is not.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.atomic import atomic_write
from ..core.errors import LoRAError
from ..core.freeze import freeze_base
from ..core.inject import Mode, inject
from ..core.lookup import iter_lora, list_adapters
from ..core.targets import AdaptTarget, layer_kind, module_targets
from ..variants.dora import is_dora
from ..variants.lora import LoRAParametrization

__all__ = ["KOHYA_PREFIXES", "export_kohya", "import_kohya", "read_kohya_file"]

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
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
        and not isinstance(m, LoRAParametrization)
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


@dataclass
class _Entry:
    """The tensors of one kohya module entry."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: Tensor | None = None
    dora: Tensor | None = None


def _split(key: str) -> tuple[str, str]:
    stem, _, suffix = key.partition(".")
    return stem, suffix


def _which_prefix(stem: str) -> str | None:
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return prefix
    return None


def _shape_error(key: str, tensor: Tensor, path: str, want: str) -> LoRAError:
    return LoRAError(
        f"{key!r} has shape {tuple(tensor.shape)}, but '{path}' needs {want}; the file was "
        "made for another model."
    )


def _check_pair(stem: str, path: str, module: nn.Module, entry: _Entry) -> tuple[Tensor, Tensor]:
    """Check down/up against the layer and return ``(A, B)`` as (r, fan_in) and (fan_out, r)."""
    assert entry.down is not None and entry.up is not None
    down, up = entry.down, entry.up
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoRAError(f"{stem!r}: lora_down/lora_up must be floating-point tensors.")
    rank = down.shape[0] if down.dim() else 0
    target = module_targets(path, module)
    assert target is not None
    t = target[0]
    is_conv = t.kind == "conv"
    kernel = tuple(t.shape[2:]) if is_conv else ()
    pointwise = all(k == 1 for k in kernel)
    if is_conv and module.groups != 1:
        raise LoRAError(
            f"'{path}' is a grouped convolution (groups={module.groups}); kohya LoRA does not "
            "describe those."
        )
    # A Linear takes (r, in) or 1x1-conv (r, in, 1, 1) keys; a 1x1 conv takes either too.
    as_matrix = (
        down.dim() >= 2
        and down.shape[1] == t.fan_in
        and all(s == 1 for s in down.shape[2:])
        and pointwise
    )
    as_kernel = is_conv and tuple(down.shape[1:]) == tuple(t.shape[1:])
    down_ok = rank > 0 and (as_matrix or as_kernel)
    if not down_ok:
        want = f"({rank}, {t.fan_in // max(1, math.prod(kernel))}, {', '.join(map(str, kernel))})"
        raise _shape_error(f"{stem}.lora_down.weight", down, path, want if is_conv else "(r, in)")
    up_ok = (
        up.dim() >= 2
        and tuple(up.shape[:2]) == (t.fan_out, rank)
        and all(s == 1 for s in up.shape[2:])
    )
    if not up_ok:
        raise _shape_error(f"{stem}.lora_up.weight", up, path, f"({t.fan_out}, {rank}[, 1, 1])")
    return down.reshape(rank, t.fan_in), up.reshape(t.fan_out, rank)


def _alpha(stem: str, entry: _Entry, rank: int) -> float:
    if entry.alpha is None:
        return float(rank)  # kohya's rule: no alpha means scale 1
    if entry.alpha.numel() != 1:
        raise LoRAError(f"{stem}.alpha must be a scalar, got shape {tuple(entry.alpha.shape)}.")
    value = float(entry.alpha.float().item())
    if not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{stem}.alpha is {value}; it must be a positive number.")
    return value


def _magnitude(stem: str, entry: _Entry, target: AdaptTarget) -> Tensor | None:
    if entry.dora is None:
        return None
    d = entry.dora
    if d.dim() == 0 or d.shape[0] != target.fan_out or d.numel() != target.fan_out:
        raise LoRAError(
            f"{stem}.dora_scale has shape {tuple(d.shape)}; only the per-output magnitude "
            f"({target.fan_out}, 1, ...) (LyCORIS wd_on_out=True) is supported."
        )
    return d.reshape(-1)


def _group(
    state: Mapping[str, Tensor], prefix: str
) -> tuple[dict[str, _Entry], list[str], list[str]]:
    """Entries of ``prefix``, and the keys of other methods and of no known prefix."""
    entries: dict[str, _Entry] = {}
    foreign: list[str] = []
    unknown: list[str] = []
    for key, tensor in state.items():
        stem, suffix = _split(key)
        owner = _which_prefix(stem)
        if owner is None:
            unknown.append(key)
            continue
        if owner != prefix:
            continue  # another part of the pipeline: loaded by the call with its prefix
        if suffix not in _SUFFIXES:
            foreign.append(key)
            continue
        entry = entries.setdefault(stem, _Entry())
        field = {
            "lora_down.weight": "down",
            "lora_up.weight": "up",
            "alpha": "alpha",
            "dora_scale": "dora",
        }[suffix]
        setattr(entry, field, tensor)
    return entries, foreign, unknown


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
    """Load a kohya / A1111 LoRA (or LoCon, or LyCORIS DoRA) file into a model as an adapter.

    Every key is checked against the model before anything changes; on error the model is
    exactly as it was. For a file holding UNet and text-encoder parts, call once per model::

        import_kohya(pipe.unet, "style.safetensors", adapter="style")
        import_kohya(pipe.text_encoder, "style.safetensors", prefix="lora_te", adapter="style")

    Args:
        model: The model the ``prefix`` part of the file belongs to (a diffusers
            ``UNet2DConditionModel``, a ``CLIPTextModel``, any module).
        path_or_state_dict: A ``.safetensors`` file or an already loaded state dict.
        prefix: ``"lora_unet"``, ``"lora_te"``, ``"lora_te1"`` or ``"lora_te2"``. Keys of the
            other kohya prefixes are ignored.
        adapter: Name of the new adapter.
        strict: Refuse keys of other methods (LyCORIS ``hada_*``, ``lokr_*``, ...), keys of no
            module of the model, and keys of no known prefix. With ``strict=False`` they are
            skipped and listed in a warning.
        freeze: Freeze the base model (every non-adapter parameter).
        mode: Forward mode of the adapter (see :func:`~lora_param.add_lora`).

    Returns:
        The model, with the adapter enabled.

    Raises:
        LoRAError: A damaged file, unknown or unsupported keys (when strict), a shape that
            does not fit, an adapter name already in use.
    """
    if not isinstance(model, nn.Module):
        raise LoRAError(f"import_kohya needs an nn.Module, got {type(model).__name__}.")
    if prefix not in KOHYA_PREFIXES:
        raise LoRAError(f"prefix must be one of {list(KOHYA_PREFIXES)}, got {prefix!r}.")
    if adapter in list_adapters(model):
        raise LoRAError(
            f"adapter {adapter!r} already exists in this model; pass another adapter= name."
        )
    state = _as_state_dict(path_or_state_dict)
    entries, foreign, unknown = _group(state, prefix)
    resolver = _Resolver(model)
    plan: list[tuple[AdaptTarget, dict]] = []
    values: list[tuple[str, Tensor, Tensor, Tensor | None]] = []
    no_module: list[str] = []
    for stem, entry in entries.items():
        if entry.down is None or entry.up is None:
            present = zip(_SUFFIXES, (entry.down, entry.up, entry.alpha, entry.dora), strict=True)
            foreign.extend(f"{stem}.{suffix}" for suffix, t in present if t is not None)
            continue
        path = resolver.resolve(stem[len(prefix) + 1 :])
        if path is None:
            no_module.append(stem)
            continue
        module = resolver.modules[path]
        lora_a, lora_b = _check_pair(stem, path, module, entry)
        target = module_targets(path, module)[0]  # type: ignore[index]
        rank = lora_a.shape[0]
        magnitude = _magnitude(stem, entry, target)
        options: dict[str, Any] = {"rank": rank, "alpha": _alpha(stem, entry, rank)}
        if magnitude is not None:
            options["use_dora"] = True
        plan.append((target, options))
        values.append((target.path, lora_a, lora_b, magnitude))
    problems = []
    if foreign:
        problems.append(
            f"keys of another method or incomplete entries (lora_param reads lora_down/"
            f"lora_up/alpha/dora_scale only): {sorted(foreign)[:10]}"
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
        for tpath, lora_a, lora_b, magnitude in values:
            entry_p = loaded[tpath]
            entry_p.lora_A.copy_(lora_a)
            entry_p.lora_B.copy_(lora_b)
            if magnitude is not None and is_dora(entry_p):
                entry_p.lora_magnitude.copy_(magnitude)
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

    Args:
        model: A model with adapters on Linear / Conv / HF Conv1D layers.
        path: Where to write.
        prefix: Key prefix for this model part (``"lora_unet"``, ``"lora_te"``, ...).
        adapter: The adapter to write; may be None when the model has exactly one.

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
    out: dict[str, Tensor] = {}
    for tpath, module, tensor_name, p in iter_lora(model):
        if p.adapter != adapter:
            continue
        module_path = tpath.rpartition(".")[0]
        if tensor_name != "weight" or p.kind not in ("linear", "conv", "conv1d_hf"):
            raise LoRAError(
                f"'{tpath}' ({p.kind}) cannot be written as a kohya entry: kohya files adapt "
                "Linear and Conv layers only. Export the others with save_lora or export_peft."
            )
        if p.kind == "conv" and module.groups != 1:
            raise LoRAError(f"'{tpath}' is a grouped convolution; kohya files do not describe it.")
        stem = _export_name(model, module_path, prefix)
        a, b = p.lora_A.detach(), p.lora_B.detach()
        shape = tuple(p.weight_shape)
        if p.kind == "conv":
            a = a.reshape(p.rank, *shape[1:])
            b = b.reshape(p.fan_out, p.rank, *([1] * (len(shape) - 2)))
        alpha = p.alpha * math.sqrt(p.rank) if p.use_rslora else p.alpha
        out[f"{stem}.lora_down.weight"] = a.contiguous().cpu()
        out[f"{stem}.lora_up.weight"] = b.contiguous().cpu()
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if is_dora(p):
            m = p.lora_magnitude.detach()
            ones = [1] * (len(shape) - 1)
            out[f"{stem}.dora_scale"] = m.reshape(-1, *ones).contiguous().cpu()
    st = _safetensors_torch()
    metadata = {"ss_network_module": "networks.lora", "lora_param_adapter": adapter}
    data = st.save(out, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))
