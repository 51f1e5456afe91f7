"""Write lora_param adapters as a PEFT LoRA adapter folder (``export_peft``).

The layouts are described in :mod:`lora_param.interop.peft_format`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from torch import Tensor, nn

from ..core.atomic import atomic_write
from ..core.copies import (
    iter_copies,
)
from ..core.distributed import check_in, full_tensor, is_sharded, write_once
from ..core.errors import LoRAError
from ..core.lookup import iter_lora, list_adapters
from ..core.paths import check_output_folder
from ..core.targets import tensor_names
from ..variants.lora import LoRAParametrization
from .peft_codecs import codec_for_entry, folder_format
from .peft_format import (
    CONFIG_NAME,
    PREFIX,
    SAFETENSORS_NAME,
    module_names,
    peft_pattern_key,
    safetensors_module,
    unwrap_model,
)
from .peft_params import (
    BASE_LAYER,
    experts_to_peft,
    wrapper_depths,
)

__all__ = ["export_peft"]


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value PEFT reads for ``key`` from a rank_pattern / alpha_pattern, or ``default``."""
    pattern = peft_pattern_key(patterns, key)
    return default if pattern is None else patterns[pattern]


def _peft_targets(target_modules: list[str] | str | None, key: str) -> bool:
    """Whether PEFT's target_modules selects the module ``key``.

    Mirrors ``peft.tuners.tuners_utils.check_target_module_exists``.
    """
    if not target_modules:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith(f".{t}") for t in target_modules)


def _exact_regex(paths: list[str]) -> str:
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def _peft_tensors(
    module_path: str, module: nn.Module, tensor_name: str, p: Any, a: Tensor, b: Tensor
) -> tuple[str, dict[str, Tensor]]:
    """PEFT keys and tensors for one adapted tensor, and the target kind ('module'|'param').

    ``a`` and ``b`` are the LoRA factors the codec gives for the entry (our layout).
    """
    kind = p.kind
    rank = int(a.shape[-2])
    where = f"'{module_path}.{tensor_name}'" if module_path else f"'{tensor_name}'"
    if not module_path:
        raise LoRAError(
            f"{where} belongs to the model's root module; PEFT can only adapt submodules. "
            "Wrap the layer in a container (e.g. nn.Sequential(layer)) before add_lora."
        )
    pre = PREFIX + module_path
    if kind in ("linear", "conv1d_hf", "conv", "embedding") and tensor_name != "weight":
        kind = "param"
    if kind in ("linear", "conv1d_hf"):
        return "module", {f"{pre}.lora_A.weight": a, f"{pre}.lora_B.weight": b}
    if kind == "conv":
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise LoRAError(
                f"{where}: PEFT adapts only nn.Conv1d/2d/3d, not {type(module).__name__}."
            )
        if module.groups != 1:
            raise LoRAError(
                f"{where} is a grouped convolution (groups={module.groups}); PEFT's LoRA for "
                "grouped convolutions has a different structure, so this adapter cannot be "
                "exported. Exclude grouped/depthwise convolutions (exclude=... or "
                "layer_types=...) to export."
            )
        if any(d != 1 for d in module.dilation):
            raise LoRAError(
                f"{where} has dilation={tuple(module.dilation)}; PEFT's LoRA convolution ignores "
                "dilation and would compute something else. Exclude this layer to export."
            )
        pads = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        if module.padding_mode != "zeros" and pads not in ((0,) * len(pads), ("valid",)):
            raise LoRAError(
                f"{where} uses padding_mode={module.padding_mode!r}; PEFT's LoRA convolution pads "
                "with zeros and would compute something else. Exclude this layer to export."
            )
        shape = tuple(p.weight_shape)
        a4 = a.reshape(rank, *shape[1:])
        b4 = b.reshape(p.fan_out, rank, *([1] * (len(shape) - 2)))
        return "module", {f"{pre}.lora_A.weight": a4, f"{pre}.lora_B.weight": b4}
    if kind == "embedding":
        # PEFT: delta = (B_peft @ A_peft).T with A_peft (r, num), B_peft (dim, r);
        # lora_param: delta = B @ A with B (num, r), A (r, dim).
        return "module", {f"{pre}.lora_embedding_A": b.t(), f"{pre}.lora_embedding_B": a.t()}
    if getattr(p, "dropout_p", 0.0) and kind in ("param", "experts"):
        raise LoRAError(
            f"{where}: PEFT refuses lora_dropout on parameters given by name (target_parameters); "
            "add the adapter with dropout=0 to export it."
        )
    if kind == "experts":
        if p.fan_in_fan_out != bool(getattr(module, "is_transposed", False)):
            raise LoRAError(
                f"{where} was adapted with expert_layout="
                f"{'in_out' if p.fan_in_fan_out else 'out_in'!r}, but PEFT reads the layout from "
                f"the module's is_transposed flag ({getattr(module, 'is_transposed', False)}) and "
                "would apply the update transposed. Add the adapter with expert_layout=None."
            )
        flat_a, flat_b = experts_to_peft(a, b)
        return "param", {f"{pre}.lora_A.weight": flat_a, f"{pre}.lora_B.weight": flat_b}
    # a parameter adapted by name: PEFT's target_parameters (ParamWrapper), 2-D only
    if len(p.weight_shape) != 2 or p.fan_in_fan_out:
        raise LoRAError(
            f"{where} has shape {tuple(p.weight_shape)}; PEFT adapts parameters given by name "
            "(target_parameters) only as 2-D (out, in) matrices (3-D ones are read as experts)."
        )
    if getattr(p, "dropout_p", 0.0):
        raise LoRAError(
            f"{where}: PEFT refuses lora_dropout on parameters given by name (target_parameters); "
            "add the adapter with dropout=0 to export it."
        )
    return "param", {f"{pre}.lora_A.weight": a, f"{pre}.lora_B.weight": b}


def _nested_parameters(model: nn.Module, adapter: str) -> dict[str, int]:
    """Wrapper depth of each tensor adapted by name in a module where PEFT nests several."""
    by_module: dict[int, tuple[nn.Module, str, dict[str, str]]] = {}
    for tensor_path, module, tensor_name, p in iter_lora(model):
        if p.adapter == adapter:
            entry = by_module.setdefault(id(module), (module, tensor_path, {}))
            entry[2][tensor_name] = tensor_path
    depths: dict[str, int] = {}
    for module, _, named in by_module.values():
        if len(named) > 1 and "weight" not in named:
            for name, depth in wrapper_depths(module, list(named)).items():
                depths[named[name]] = depth
    return depths


def _export_any(
    model: nn.Module,
    adapter: str | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The folder's config and tensors: PEFT's LoRA layout, or the folder type of a variant
    PEFT keeps in another tuner (:func:`~.peft_codecs.register_peft_folder_format`)."""
    inner = unwrap_model(model)
    names = list_adapters(inner)
    chosen = adapter if adapter is not None else (names[0] if len(names) == 1 else None)
    variants = {p.variant for *_, p in iter_lora(inner) if p.adapter == chosen}
    fmt = folder_format(variant=next(iter(variants))) if len(variants) == 1 else None
    if fmt is None or chosen is None:
        return _build_export(model, adapter, base_model_name_or_path, task_type)
    config, tensors = fmt.export(inner, chosen)
    config = {
        "peft_type": fmt.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        **config,
    }
    return config, {k: t.contiguous().clone() for k, t in tensors.items()}


def _build_export(
    model: nn.Module,
    adapter: str | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    model = unwrap_model(model)
    names = list_adapters(model)
    if not names:
        raise LoRAError("the model has no LoRA adapter to export (call add_lora first).")
    if adapter is None:
        if len(names) > 1:
            raise LoRAError(
                f"the model has several adapters {names}; pass adapter=<name> to choose the one "
                "to export (a PEFT folder holds one adapter)."
            )
        adapter = names[0]
    elif adapter not in names:
        raise LoRAError(f"no adapter named {adapter!r} in this model; it has {names}.")

    entries = []  # (module path, target kind, parametrization, tensor path)
    ranks: list[int] = []
    codec_alphas: list[float] = []
    tensors: dict[str, Tensor] = {}
    owners: dict[str, str] = {}
    nested = _nested_parameters(model, adapter)
    for tensor_path, module, tensor_name, p in iter_lora(model):
        if p.adapter != adapter:
            continue
        module_path = tensor_path[: -len(tensor_name)].rstrip(".")
        codec = codec_for_entry(p, tensor_path)
        a, b, rank, alpha = codec.factors(p)
        target_kind, pair = _peft_tensors(module_path, module, tensor_name, p, a, b)
        pair.update(codec.export_extra(p, module_path, target_kind))
        if tensor_path in nested:  # PEFT nests one wrapper per adapted parameter
            depth = f".{BASE_LAYER}" * nested[tensor_path]
            pair = {
                PREFIX + module_path + depth + k[len(PREFIX + module_path) :]: t
                for k, t in pair.items()
            }
        elif module_path in owners:
            raise LoRAError(
                f"adapter {adapter!r} adapts both '{owners[module_path]}' and '{tensor_path}' of "
                f"module '{module_path}'; PEFT keys adapters by module, so only one adapted tensor "
                "per module can be exported."
            )
        owners[module_path] = tensor_path
        entries.append((module_path, target_kind, p, tensor_path))
        ranks.append(rank)
        codec_alphas.append(float(alpha))
        for key, t in pair.items():
            tensors[key] = t.contiguous().clone()

    # The model's MultiheadAttention never calls out_proj.forward, so PEFT's (forward-replacing)
    # LoRA on out_proj would be silently ignored by PEFT: refuse rather than write a file that
    # PEFT would read as something else.
    mha_out = {
        f"{n}.out_proj" if n else "out_proj"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    ignored = [path for path, kind, _, _ in entries if kind == "module" and path in mha_out]
    if ignored:
        raise LoRAError(
            f"adapter {adapter!r} adapts {ignored}, the out_proj of nn.MultiheadAttention. "
            "lora_param applies it (the parametrized weight is what attention reads) but PEFT "
            "wraps out_proj's forward, which MultiheadAttention never calls, so PEFT would "
            "silently drop it. Add the adapter without out_proj (exclude='*.out_proj') to "
            "export it."
        )

    # The LoRA family's fields (lora and dora, the variants PEFT's LoRA folder holds).
    ps = [cast(LoRAParametrization, p) for _, _, p, _ in entries]
    rslora_values = {bool(p.use_rslora) for p in ps}
    use_rslora = rslora_values == {True}
    if len(rslora_values) == 1:
        alphas = codec_alphas
    else:  # mixed: express every layer's scale as alpha / r
        alphas = [float(p.scale) * r for p, r in zip(ps, ranks, strict=True)]
    default_r = Counter(ranks).most_common(1)[0][0]
    default_alpha = Counter(alphas).most_common(1)[0][0]

    module_paths = [path for path, kind, _, _ in entries if kind == "module"]
    param_paths = [
        f"{path}.{t.rsplit('.', 1)[1]}" for path, kind, _, t in entries if kind == "param"
    ]
    # PEFT looks up patterns by module path, or by "<module>.<parameter>" for target_parameters
    all_paths = [t if kind == "param" else path for path, kind, _, t in entries]

    # rank_pattern / alpha_pattern: plain module paths where PEFT resolves them unambiguously,
    # anchored exact regexes otherwise.
    def patterns(values: list, default) -> dict[str, Any]:
        plain = {
            path: _plain_number(v)
            for path, v in zip(all_paths, values, strict=True)
            if v != default
        }
        exact = {f"^{re.escape(k)}": v for k, v in plain.items()}
        for candidate in (plain, exact):
            ok = all(
                _pattern_value(candidate, path, default) == v
                for path, v in zip(all_paths, values, strict=True)
            )
            if ok:
                return candidate
        raise LoRAError(
            "internal error: could not express per-layer ranks/alphas for PEFT"
        )  # pragma: no cover

    rank_pattern = patterns(ranks, default_r)
    alpha_pattern = patterns(alphas, default_alpha)

    base_names = module_names(model)
    target_modules: list[str] | str | None = sorted(module_paths) if module_paths else None
    if module_paths:
        wanted = set(module_paths)
        if {n for n in base_names if _peft_targets(target_modules, n)} != wanted:
            target_modules = _exact_regex(sorted(module_paths))
    target_parameters = sorted(param_paths) if param_paths else None
    if target_parameters:
        base_params = [
            f"{n}.{pn}" if n else pn
            for n, m in model.named_modules()
            if "parametrizations" not in n.split(".")
            for pn in tensor_names(m)
        ]
        chosen = {
            k
            for k in base_params
            if k in target_parameters or any(k.endswith(f".{t}") for t in target_parameters)
        }
        if chosen != set(param_paths):
            raise LoRAError(
                "PEFT's target_parameters matches by name suffix and would also adapt "
                f"{sorted(chosen - set(param_paths))}; this adapter cannot be expressed in "
                "PEFT's format."
            )
        if target_modules is None:
            target_modules = []

    variants = {p.variant for p in ps}
    if len(variants) > 1:
        raise LoRAError(
            f"adapter {adapter!r} mixes the variants {sorted(variants)} over its layers; a "
            "PEFT folder holds one variant for the whole adapter."
        )
    flags = codec_for_entry(ps[0], entries[0][3]).flags
    copy_tensors, modules_to_save, bias = _export_copies(model, adapter, owners, base_names)
    tensors.update(copy_tensors)

    conv1d_hf = [p.kind == "conv1d_hf" for p in ps]
    dropouts = [float(getattr(p, "dropout_p", 0.0)) for p in ps]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": default_r,
        "lora_alpha": _plain_number(default_alpha),
        "lora_dropout": Counter(dropouts).most_common(1)[0][0],
        "target_modules": target_modules,
        "fan_in_fan_out": bool(conv1d_hf) and all(conv1d_hf),
        "bias": bias,
        "use_rslora": use_rslora,
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        **flags,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    return config, tensors


def _export_copies(
    model: nn.Module, adapter: str, lora_modules: Mapping[str, str], base_names: list[str]
) -> tuple[dict[str, Tensor], list[str] | None, str]:
    """PEFT keys for the heads and biases the adapter trains, ``modules_to_save`` and ``bias``.

    PEFT 0.21 stores a ``modules_to_save`` module's tensors under the module's own names
    (``base_model.model.head.weight``), a trained bias of a LoRA layer under its base layer
    (``...fc1.base_layer.bias``) and other trained biases under their own names.
    """
    copies = [(path, c) for path, _, _, c in iter_copies(model) if c.adapter == adapter]
    owners = sorted({c.owner for _, c in copies if c.role == "module"})
    tensors: dict[str, Tensor] = {}
    for owner in owners:
        inside = [m for m in lora_modules if m == owner or m.startswith(owner + ".")]
        if inside:
            raise LoRAError(
                f"adapter {adapter!r} trains '{owner}' in full and also puts LoRA on {inside}; "
                "PEFT's modules_to_save cannot hold LoRA layers. Leave them out of targets."
            )
        held = {path for path, c in copies if c.role == "module" and c.owner == owner}
        wanted = _tensor_paths(owner, model.get_submodule(owner))
        if not held >= wanted:
            raise LoRAError(
                f"adapter {adapter!r} trains only part of '{owner}'; PEFT's modules_to_save "
                f"holds whole modules (missing {sorted(wanted - held)[:5]})."
            )
    if owners:
        chosen = {n for n in base_names if n and any(n.endswith(o) for o in owners)}
        if chosen != set(owners):
            raise LoRAError(
                f"PEFT's modules_to_save matches module names by suffix and would also train "
                f"{sorted(chosen - set(owners))[:5]}; adapter {adapter!r} cannot be expressed in "
                "PEFT's format."
            )
    biases: set[str] = set()
    for path, c in copies:
        value = full_tensor(c.value)  # all-gathered if sharded (FSDP2)
        if c.role == "module":
            tensors[PREFIX + path] = value
            continue
        module_path, _, leaf = path.rpartition(".")
        if leaf != "bias":
            raise LoRAError(
                f"adapter {adapter!r} trains '{path}'; PEFT saves only trained biases named "
                "'bias', so this adapter cannot be exported (add it with bias='none')."
            )
        biases.add(module_path)
        # PEFT wraps a LoRA layer once per adapted tensor; the bias sits under every wrapper.
        depth = sum(
            1
            for t, _, _, p in iter_lora(model)
            if p.adapter == adapter and t.rpartition(".")[0] == module_path
        )
        wrappers = f".{BASE_LAYER}" * depth if module_path in lora_modules else ""
        tensors[f"{PREFIX}{module_path}{wrappers}.bias"] = value
    bias = "none"
    if biases:
        bias = "lora_only" if biases <= set(lora_modules) else "all"
    return tensors, owners or None, bias


def _tensor_paths(owner: str, module: nn.Module) -> set[str]:
    """Paths of every tensor of a module and its submodules, as a plain model names them."""
    out = set()
    for sub_name, sub in module.named_modules():
        if "parametrizations" in sub_name.split("."):
            continue
        prefix = f"{owner}.{sub_name}" if sub_name else owner
        out |= {f"{prefix}.{t}" for t in tensor_names(sub)}
    return out


def _default_name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(unwrap_model(model), "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return str(name) if name else None


def export_peft(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write one adapter as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory``
    (created if needed; each file is replaced atomically). Per-layer ranks and alphas go into
    ``rank_pattern`` / ``alpha_pattern``; ``use_rslora`` is kept (a mix of rsLoRA and plain layers
    is written as the equivalent ``alpha`` per layer); HF ``Conv1D`` layers set ``fan_in_fan_out``.

    On a sharded (FSDP2) model this is a collective: call it on every rank; the adapter is
    gathered and rank 0 alone writes the folder.

    Args:
        model: A model with adapters (a ``torch.compile`` or DDP wrapper is looked through).
        save_directory: Folder to write.
        adapter: Which adapter to write; may be omitted when the model has only one.
        base_model_name_or_path: Stored in the config for PEFT (defaults to a Hugging Face
            model's ``config.name_or_path``, else None).
        task_type: PEFT task type to store, e.g. ``"CAUSAL_LM"`` (default None: a plain
            ``PeftModel``).

    Returns:
        The folder, as a Path.

    Raises:
        LoRAError: the folder cannot be written (it is a file, a place that is not writable), or
            the adapter has a layer PEFT cannot represent the same way (grouped or
            dilated convolutions, several adapted tensors in one module, the out_proj of an
            ``nn.MultiheadAttention``, ...); nothing is written.
        ImportError: safetensors is not installed (``pip install "lora_param[peft]"``).
    """
    st = safetensors_module()
    if base_model_name_or_path is None:
        base_model_name_or_path = _default_name_or_path(model)
    out = Path(save_directory)
    sharded = any(is_sharded(p.anchor()) for *_, p in iter_lora(unwrap_model(model)))
    if sharded:
        check_in("export_peft")
    else:
        check_output_folder(out, "PEFT adapter folder")
    config, tensors = _export_any(model, adapter, base_model_name_or_path, task_type)

    def write() -> None:
        check_output_folder(out, "PEFT adapter folder")
        for name in (SAFETENSORS_NAME, CONFIG_NAME):
            if (out / name).is_dir():
                raise LoRAError(f"cannot write '{out / name}': it is a folder.")
        out.mkdir(parents=True, exist_ok=True)
        blob = st.save(tensors, metadata={"format": "pt"})
        atomic_write(out / SAFETENSORS_NAME, lambda f: f.write(blob))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode("utf-8")))

    write_once(out, write, collective=sharded)
    return out
