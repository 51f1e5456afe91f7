"""Interchange with Hugging Face PEFT: write and read PEFT's LoRA adapter folders.

A PEFT LoRA adapter is a folder with two files:

* ``adapter_config.json``: ``peft_type: "LORA"``, the default rank ``r`` and ``lora_alpha``,
  ``target_modules``, per-layer ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``,
  ``fan_in_fan_out`` ... (a subset of ``peft.LoraConfig``'s fields);
* ``adapter_model.safetensors``: one pair of tensors per adapted layer, keyed
  ``base_model.model.<module path>.lora_A.weight`` / ``...lora_B.weight`` (the adapter name is
  not part of the key).

The layouts per layer type, as PEFT stores them (``r`` is the rank, ``s`` the scale):

=====================  ===============================  ================================
layer                  ``lora_A``                       ``lora_B``
=====================  ===============================  ================================
``nn.Linear``          ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
HF ``Conv1D``          ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
``nn.Conv{1,2,3}d``    ``.lora_A.weight`` (r, in, *k)   ``.lora_B.weight`` (out, r, 1..)
``nn.Embedding``       ``.lora_embedding_A`` (r, num)   ``.lora_embedding_B`` (dim, r)
2-D ``nn.Parameter``   ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
=====================  ===============================  ================================

(HF ``Conv1D`` stores its weight ``(in, out)``; PEFT marks it with ``fan_in_fan_out`` and keeps
``A``/``B`` in the ``nn.Linear`` orientation, which is also lora_param's. A 2-D parameter, such as
``nn.MultiheadAttention.in_proj_weight``, goes through PEFT's ``target_parameters``; the key is
the owning module's path.) ``lora_param`` keeps the same ``A``/``B`` for every type except the
embedding, whose factors PEFT stores transposed and swapped.

Neither function needs ``peft`` itself; both need ``safetensors`` (``pip install
"lora_param[peft]"``), which is imported only when called.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.distributed import check_in, full_tensor, is_sharded, write_once
from ..core.dora import is_dora
from ..core.errors import LoRAError
from ..core.inject import Mode, add_lora
from ..core.io import atomic_write
from ..core.layers import base_tensor, is_hf_conv1d, tensor_names
from ..core.merge import remove_lora
from ..core.paths import check_input_file, check_input_folder, check_output_folder
from ..core.registry import iter_lora, list_adapters
from ..core.trainable_copies import (
    CopyPlan,
    CopyRole,
    check_copyable,
    iter_copies,
    register_copies,
)
from .peft_params import (
    BASE_LAYER,
    experts_from_peft,
    experts_to_peft,
    split_wrappers,
    wrapper_depths,
)

__all__ = ["export_peft", "import_peft"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_EXTRA_HINT = 'pip install "lora_param[peft]"'

# LoraConfig fields that change what a LoRA adapter computes and that import_peft cannot honour
# when they are set to anything but these values.
_UNSUPPORTED_FIELDS: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}
_FIELD_HINT = {
    "lora_bias": "a bias on lora_B is not part of lora_param's adapters",
    "trainable_token_indices": "trainable tokens are not LoRA",
}


# --------------------------------------------------------------------------------------------
# small helpers


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "PEFT interchange needs the 'safetensors' package; install it with "
            f"`{_EXTRA_HINT}` (or `pip install safetensors`)."
        ) from exc
    return st


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DataParallel",
            "DistributedDataParallel",
        ):
            model = cast(nn.Module, model.module)
            continue
        return model


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _module_names(model: nn.Module) -> list[str]:
    """Module names as a fresh copy of the base model has them (no parametrization modules)."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if "parametrizations" in parts:
            continue
        names.append(name)
    return names


def _peft_pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """Which rank_pattern / alpha_pattern entry PEFT picks for a module.

    Mirrors ``peft.utils.other.get_pattern_key``.
    """
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        except re.error:
            continue
    return None


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value PEFT reads for ``key`` from a rank_pattern / alpha_pattern, or ``default``."""
    pattern = _peft_pattern_key(patterns, key)
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


def _glob_escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------------------------
# export


def _peft_tensors(
    module_path: str, module: nn.Module, tensor_name: str, p: Any
) -> tuple[str, dict[str, Tensor]]:
    """PEFT keys and tensors for one adapted tensor, and the target kind ('module'|'param')."""
    kind = p.kind
    a, b = full_tensor(p.lora_A), full_tensor(p.lora_B)  # all-gathered if sharded (FSDP2)
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
        a4 = a.reshape(p.rank, *shape[1:])
        b4 = b.reshape(p.fan_out, p.rank, *([1] * (len(shape) - 2)))
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


def _peft_magnitude(module_path: str, target_kind: str, p: Any) -> dict[str, Tensor]:
    """PEFT's ``lora_magnitude_vector`` for a DoRA layer: (n,), or (1, out, 1, ...) for convs."""
    if target_kind != "module":
        raise LoRAError(
            f"'{module_path}': PEFT has no DoRA for parameters given by name (target_parameters)."
        )
    m = p.lora_magnitude.detach()
    if p.kind == "conv":
        m = m.reshape(1, -1, *([1] * (len(p.weight_shape) - 2)))
    return {f"{PREFIX}{module_path}.lora_magnitude_vector": m}


def _build_export(
    model: nn.Module,
    adapter: str | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    model = _unwrap(model)
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
    tensors: dict[str, Tensor] = {}
    owners: dict[str, str] = {}
    nested = _nested_parameters(model, adapter)
    for tensor_path, module, tensor_name, p in iter_lora(model):
        if p.adapter != adapter:
            continue
        module_path = tensor_path[: -len(tensor_name)].rstrip(".")
        target_kind, pair = _peft_tensors(module_path, module, tensor_name, p)
        if is_dora(p):
            pair.update(_peft_magnitude(module_path, target_kind, p))
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

    ps = [p for _, _, p, _ in entries]
    rslora_values = {bool(p.use_rslora) for p in ps}
    use_rslora = rslora_values == {True}
    if len(rslora_values) == 1:
        alphas = [float(p.alpha) for p in ps]
    else:  # mixed: express every layer's scale as alpha / r
        alphas = [float(p.scale) * p.rank for p in ps]
    ranks = [int(p.rank) for p in ps]
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

    base_names = _module_names(model)
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

    dora = {is_dora(p) for p in ps}
    if len(dora) > 1:
        raise LoRAError(
            f"adapter {adapter!r} is DoRA on some layers only; PEFT's use_dora is one flag for "
            "the whole adapter."
        )
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
        "use_dora": dora == {True},
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
    cfg = getattr(_unwrap(model), "config", None)
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

    On a sharded (FSDP2) model this is a collective: call it on every rank; the adapter is
    gathered and rank 0 alone writes the folder.

    Raises:
        LoRAError: the folder cannot be written (it is a file, a place that is not writable), or
            the adapter has a layer PEFT cannot represent the same way (grouped or
            dilated convolutions, several adapted tensors in one module, the out_proj of an
            ``nn.MultiheadAttention``, ...); nothing is written.
        ImportError: safetensors is not installed (``pip install "lora_param[peft]"``).
    """
    st = _safetensors()
    if base_model_name_or_path is None:
        base_model_name_or_path = _default_name_or_path(model)
    out = Path(save_directory)
    sharded = any(is_sharded(p.lora_A) for *_, p in iter_lora(_unwrap(model)))
    if sharded:
        check_in("export_peft")
    else:
        check_output_folder(out, "PEFT adapter folder")
    config, tensors = _build_export(model, adapter, base_model_name_or_path, task_type)

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


# --------------------------------------------------------------------------------------------
# import


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    hint = f"; a PEFT adapter is a folder with {CONFIG_NAME}"
    check_input_folder(path, "PEFT adapter folder", hint)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise LoRAError(f"'{path}' has no {CONFIG_NAME}; is it a PEFT adapter folder?")
    check_input_file(cfg_file, "PEFT adapter config")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoRAError(
            f"'{cfg_file}' is damaged: not valid UTF-8 JSON ({_first_line(exc)})."
        ) from None
    if not isinstance(config, dict):
        raise LoRAError(f"'{cfg_file}' is damaged: it does not hold a JSON object.")
    if (path / SAFETENSORS_NAME).exists():
        weights = check_input_file(path / SAFETENSORS_NAME, "PEFT adapter weights")
        st = _safetensors()
        try:
            tensors = st.load_file(str(weights), device="cpu")
        except Exception as exc:  # safetensors raises its own error, OSError, ValueError ...
            raise LoRAError(
                f"'{weights}' is damaged or truncated: safetensors cannot read it "
                f"({_first_line(exc)})."
            ) from None
    elif (path / BIN_NAME).exists():
        weights = check_input_file(path / BIN_NAME, "PEFT adapter weights")
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged files
            raise LoRAError(
                f"'{weights}' is damaged, truncated or not a weights-only state dict "
                f"({_first_line(exc)})."
            ) from None
    else:
        raise LoRAError(f"'{path}' has no {SAFETENSORS_NAME} (nor {BIN_NAME}).")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point()
        for k, v in tensors.items()
    ):
        raise LoRAError(f"'{weights}' must map names to floating-point tensors; it does not.")
    return config, tensors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _dropout(value: Any) -> bool:
    return value is None or (_is_number(value) and 0 <= value < 1)


def _optional_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _pattern_of(check: Any) -> Any:
    return lambda value: (
        value is None or (isinstance(value, dict) and all(check(v) for v in value.values()))
    )


def _list_of_str(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# Every config field import_peft reads, with what it must hold.
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_positive_int, "a positive integer"),
    "lora_alpha": (_positive_number, "a positive finite number"),
    "lora_dropout": (_dropout, "a number in [0, 1) or null"),
    "use_rslora": (_optional_bool, "true, false or null"),
    "rank_pattern": (_pattern_of(_positive_int), "an object of positive integers or null"),
    "alpha_pattern": (_pattern_of(_positive_number), "an object of positive numbers or null"),
    "target_parameters": (_list_of_str, "a list of strings or null"),
    "bias": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _check_field_types(config: dict[str, Any], cfg_file: Path) -> None:
    """Each field import_peft reads has the JSON type it needs (a damaged file fails here)."""
    for field, (ok, expected) in _FIELD_TYPES.items():
        if field in config and not ok(config[field]):
            raise LoRAError(
                f"'{cfg_file}' is damaged: {field}={config[field]!r} must be {expected}."
            )


def _check_config(config: dict[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise LoRAError(
            f"'{where}' holds a PEFT {peft_type!r} adapter; only LORA adapters can be imported."
        )
    for field, ok in _UNSUPPORTED_FIELDS.items():
        value = config.get(field, ok)
        if value in (ok, None, False, [], {}):
            continue
        hint = _FIELD_HINT.get(field, "lora_param does not implement it")
        raise LoRAError(
            f"'{where}' sets {field}={value!r}, which import_peft does not support ({hint})."
        )
    bias = config.get("bias", "none")
    if bias not in ("none", None, "all", "lora_only"):
        raise LoRAError(
            f"'{where}' sets bias={bias!r}; PEFT's LoRA knows 'none', 'all', 'lora_only'."
        )


def _our_factors(layout: str, pa: Tensor, pb: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """PEFT's factors (shapes already checked) in lora_param's (rank, fan_in) / (fan_out, rank)."""
    if layout == "embedding":
        return pb.t(), pa.t()
    if layout == "layer":
        return pa.reshape(rank, -1), pb.reshape(pb.shape[0], rank)
    return pa, pb


def _split_key(key: str) -> tuple[str, str]:
    for suffix in (
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector",
    ):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, ""


def import_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    *,
    freeze: bool = True,
    mode: Mode = "factored",
) -> nn.Module:
    """Add the LoRA adapter stored in a PEFT folder to ``model`` (the matching base model).

    The adapted layers are read from the tensor keys; each layer's rank from its tensors, its
    alpha from ``alpha_pattern`` / ``lora_alpha``; ``use_rslora`` and ``lora_dropout`` are kept.
    Everything is checked (the layers exist, have the right type and shapes) before the model is
    touched. ``modules_to_save`` heads and trained biases (``bias="all"`` / ``"lora_only"``)
    become the adapter's own copies (:class:`~lora_param.TrainableCopy`), switched with it.

    Args:
        model: The base model the adapter was trained on (without that adapter).
        directory: A folder written by ``PeftModel.save_pretrained`` or :func:`export_peft`
            (``adapter_model.safetensors``, or the older ``adapter_model.bin``).
        adapter: Name to give the adapter in ``model``.
        freeze: Freeze every base parameter, as ``add_lora`` does.
        mode: ``"factored"`` or ``"materialized"``, as in ``add_lora``.

    Returns:
        The model (changed in place).

    Raises:
        LoRAError: not a LoRA folder, a feature lora_param does not model (``lora_bias``,
            trainable tokens, ...), a layer missing from the model, or shapes that do not match;
            the model is left unchanged.
    """

    path = Path(directory)
    config, raw = _read_folder(path)
    _check_field_types(config, path / CONFIG_NAME)
    _check_config(config, path)
    target = _unwrap(model)
    if adapter in list_adapters(target):
        raise LoRAError(
            f"the model already has an adapter named {adapter!r}; pass another adapter=."
        )

    groups: dict[tuple[str, int], dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, t in raw.items():
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        wrapped_path, part = _split_key(stripped)
        if not part:
            extras[stripped] = t
            continue
        groups.setdefault(split_wrappers(wrapped_path), {})[part] = t
    depths_seen = Counter(module_path for module_path, _ in groups)
    copies = _plan_peft_copies(target, config, extras, {mp for mp, _ in groups}, path)
    if not groups:
        raise LoRAError(f"'{path}' holds no LoRA tensors.")

    target_params = set(config.get("target_parameters") or [])
    modules = dict(target.named_modules())
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    magnitudes: dict[str, Tensor] = {}

    plan = []  # (tensor path, module path, A (our layout), B (our layout), rank, alpha)
    by_name: set[str] = set()  # tensors adapted through target_parameters
    for (module_path, depth), parts in groups.items():
        module = modules.get(module_path) if module_path else None
        if module is None:
            raise LoRAError(
                f"'{path}' adapts '{module_path}', which this model does not have; "
                "is this the base model the adapter was trained on?"
            )
        magnitude = parts.pop("lora_magnitude_vector", None)
        if (magnitude is not None) != use_dora:
            raise LoRAError(
                f"'{path}': layer '{module_path}' "
                + ("lacks lora_magnitude_vector" if use_dora else "has a DoRA magnitude")
                + f" but the config says use_dora={use_dora}."
            )
        if magnitude is not None:
            magnitudes[module_path] = magnitude.reshape(-1)
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        if set(parts) != {a_key, b_key}:
            raise LoRAError(
                f"'{path}': layer '{module_path}' has tensors {sorted(parts)}, expected {a_key} "
                f"and {b_key}."
            )
        pa, pb = parts[a_key], parts[b_key]
        if pa.dim() < 2 or pb.dim() < 2 or pa.shape[0] == 0:
            raise LoRAError(
                f"'{path}': layer '{module_path}' factors have shapes {tuple(pa.shape)} and "
                f"{tuple(pb.shape)}; LoRA factors are matrices of rank >= 1."
            )
        rank = int(pa.shape[0])
        expect_a: tuple[int, ...]
        expect_b: tuple[int, ...]
        # which tensor of the module carries the adapter
        param_names = [
            t.rsplit(".", 1)[1]
            for t in target_params
            if t.rsplit(".", 1)[0] == module_path or module_path.endswith("." + t.rsplit(".", 1)[0])
        ]
        param_names = [n for n in param_names if hasattr(module, n)]
        if embedding:
            if not isinstance(module, nn.Embedding):
                raise LoRAError(
                    f"'{path}': '{module_path}' has embedding factors but is a "
                    f"{type(module).__name__}."
                )
            tensor_name, expect_a, expect_b = (
                "weight",
                (rank, module.num_embeddings),
                (module.embedding_dim, rank),
            )
            layout = "embedding"
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(
            module
        ):
            if param_names:
                raise LoRAError(
                    f"'{path}': '{module_path}' is targeted both as a layer and via "
                    "target_parameters."
                )
            tensor_name = "weight"
            w = base_tensor(module, "weight")
            if isinstance(module, nn.Linear):
                out_f, in_f = w.shape
                expect_a, expect_b = (rank, in_f), (out_f, rank)
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if module.groups != 1 or any(d != 1 for d in module.dilation):
                    raise LoRAError(
                        f"'{path}': '{module_path}' is a grouped or dilated convolution; PEFT's "
                        "LoRA for it computes something lora_param does not model."
                    )
                expect_a = (rank, module.in_channels, *module.kernel_size)
                expect_b = (module.out_channels, rank, *([1] * len(module.kernel_size)))
            else:  # HF Conv1D, weight (in, out)
                in_f, out_f = w.shape
                expect_a, expect_b = (rank, in_f), (out_f, rank)
            layout = "layer"
        elif param_names and len(param_names) == depths_seen[module_path]:
            by_depth = {d: n for n, d in wrapper_depths(module, param_names).items()}
            if depth not in by_depth:
                raise LoRAError(
                    f"'{path}': '{module_path}' has factors {depth} wrapper(s) deep, but only "
                    f"{len(param_names)} of its parameters are in target_parameters."
                )
            tensor_name = by_depth[depth]
            by_name.add(f"{module_path}.{tensor_name}")
            w = base_tensor(module, tensor_name)
            if w.dim() == 3:  # experts: one LoRA each, flattened (see peft_params)
                experts = int(w.shape[0])
                rank = rank // experts
                transposed = bool(getattr(module, "is_transposed", False))
                in_f, out_f = (w.shape[1], w.shape[2]) if transposed else (w.shape[2], w.shape[1])
                expect_a, expect_b = (experts * rank, in_f), (out_f, rank * experts)
                layout = "experts"
            elif w.dim() == 2:
                expect_a, expect_b = (rank, w.shape[1]), (w.shape[0], rank)
                layout = "param"
            else:
                raise LoRAError(
                    f"'{path}': '{module_path}.{tensor_name}' is {w.dim()}-D; only 2-D parameters "
                    "and 3-D expert tensors are supported."
                )
        else:
            raise LoRAError(
                f"'{path}' adapts '{module_path}', a {type(module).__name__}; import_peft supports "
                "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, HF Conv1D, and 2-D parameters and 3-D "
                "expert tensors listed in target_parameters."
            )
        if tuple(pa.shape) != tuple(expect_a) or tuple(pb.shape) != tuple(expect_b):
            raise LoRAError(
                f"'{path}': '{module_path}' factors have shapes {tuple(pa.shape)} and "
                f"{tuple(pb.shape)}, expected {tuple(expect_a)} and {tuple(expect_b)} for this "
                "model; is this the base model the adapter was trained on?"
            )
        if layout == "experts":
            a, b = experts_from_peft(pa, pb, experts) if rank else (pa, pb)
            fan_in, fan_out = a.shape[-1], b.shape[-2]
        else:
            a, b = _our_factors(layout, pa, pb, rank)
            fan_in, fan_out = a.shape[1], b.shape[0]
        if rank > min(fan_in, fan_out):
            raise LoRAError(
                f"'{path}': '{module_path}' has rank {rank}, more than its {fan_out}x"
                f"{fan_in} matrix can hold; lora_param adapters have rank <= "
                "min(fan_in, fan_out). Retrain the adapter with a smaller rank for this layer."
            )
        key = f"{module_path}.{tensor_name}" if param_names else module_path
        alpha_key = _peft_pattern_key(alpha_pattern, key)
        alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else alpha_default
        rank_key = _peft_pattern_key(rank_pattern, key)
        declared = int(rank_pattern[rank_key]) if rank_key is not None else r_default
        if declared != rank:
            raise LoRAError(
                f"'{path}': '{module_path}' has rank {rank} in the tensors but {declared} in the "
                "config."
            )
        tensor_path = f"{module_path}.{tensor_name}"
        plan.append((tensor_path, module_path, a, b, rank, alpha))

    wanted = {tp for tp, *_ in plan}
    by_module = {mp: tp for tp, mp, *_ in plan}
    # A tensor from target_parameters is named by its path (even a custom module's "weight").
    targets = [_glob_escape(tp if tp in by_name else mp) for tp, mp, *_ in plan]
    ranks = {t: r for t, (*_, r, _) in zip(targets, plan, strict=True)}
    alphas = {t: al for t, (*_, al) in zip(targets, plan, strict=True)}
    add_lora(
        target,
        targets,
        rank=ranks,
        alpha=alphas,
        adapter=adapter,
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=use_rslora,
        freeze=freeze,
        mode=mode,
        use_dora=use_dora,
    )
    loaded = set()
    factors = {tp: (a, b) for tp, _, a, b, _, _ in plan}
    with torch.no_grad():
        for tensor_path, _module, _name, p in iter_lora(target):
            if p.adapter != adapter or tensor_path not in wanted:
                continue
            a, b = factors[tensor_path]
            p.lora_A.copy_(a.reshape(p.lora_A.shape))
            p.lora_B.copy_(b.reshape(p.lora_B.shape))
            if is_dora(p):
                p.lora_magnitude.copy_(magnitudes[tensor_path.rpartition(".")[0]])
            loaded.add(tensor_path)
    missing = wanted - loaded
    if missing:  # pragma: no cover - add_lora adapts exactly what it was asked to
        raise LoRAError(
            f"internal error: no adapter was created on {sorted(missing)} ({by_module})."
        )
    try:
        register_copies([plan for plan, _ in copies], adapter, {p.path: v for p, v in copies})
    except BaseException:
        remove_lora(target, adapter)
        raise
    return model


def _plan_peft_copies(
    model: nn.Module,
    config: Mapping[str, Any],
    extras: Mapping[str, Tensor],
    lora_modules: set[str],
    where: Path,
) -> list[tuple[CopyPlan, Tensor]]:
    """Read the tensors of a PEFT folder that are not LoRA factors as the adapter's own copies.

    ``modules_to_save`` modules keep their tensors under their own names (PEFT 0.21; older
    files and ``bias="all"`` add ``<module>.modules_to_save.<name>`` and
    ``<module>.original_module.<name>``, the latter the pretrained value, skipped); trained
    biases sit under ``<module>.base_layer.bias`` (LoRA layers) or ``<module>.bias``.
    """
    names = [n for n in _module_names(model) if n]
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise LoRAError(
            f"'{where}' sets modules_to_save={saved!r}; PEFT writes a list of module names."
        )
    owners = [n for n in names if any(n.endswith(s) for s in saved)]
    owners = [o for o in owners if not any(o.startswith(p + ".") for p in owners)]
    if saved and not owners:
        raise LoRAError(
            f"'{where}' sets modules_to_save={saved!r}, which matches no module of this model; "
            "is this the base model the adapter was trained on?"
        )
    found: dict[str, tuple[CopyRole, str, str]] = {}  # tensor path -> (role, owner, file key)
    unknown = []
    for key in extras:
        owner = next((o for o in owners if key.startswith(o + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if rest.startswith("original_module."):
                continue
            if rest.startswith("modules_to_save."):
                rest = rest[len("modules_to_save.") :]
                if f"{owner}.{rest}" in extras:
                    continue
            found[f"{owner}.{rest}"] = ("module", owner, key)
        elif key.endswith(f".{BASE_LAYER}.bias") and split_wrappers(key[:-5])[0] in lora_modules:
            found[split_wrappers(key[:-5])[0] + ".bias"] = ("bias", "", key)
        elif key.rpartition(".")[2] == "bias" and config.get("bias", "none") not in ("none", None):
            found[key] = ("bias", "", key)
        else:
            unknown.append(key)
    if unknown:
        raise LoRAError(
            f"'{where}' holds tensors that are not LoRA factors of the supported layer types, "
            f"modules_to_save tensors or trained biases: {sorted(unknown)[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}."
        )
    modules = dict(model.named_modules())
    plans = []
    for tensor_path, (role, owner, key) in found.items():
        module_name, _, tensor = tensor_path.rpartition(".")
        module = modules.get(module_name)
        if module is None or tensor not in tensor_names(module):
            raise LoRAError(
                f"'{where}' trains '{tensor_path}', which this model does not have; "
                "is this the base model the adapter was trained on?"
            )
        have = tuple(base_tensor(module, tensor).shape)
        if have != tuple(extras[key].shape):
            raise LoRAError(
                f"'{where}': '{tensor_path}' has shape {tuple(extras[key].shape)} in the adapter "
                f"but {have} in this model; is this the base model the adapter was trained on?"
            )
        check_copyable(tensor_path, module, tensor)
        plans.append((CopyPlan(tensor_path, module, tensor, role, owner), extras[key]))
    return plans
