"""PEFT's OFT adapter folders (``peft_type: "OFT"``) both ways, for input-side OFT.

PEFT 0.21's OFT (``peft.tuners.oft``) rotates a layer's input features, ``W' = W Rᵀ``: lora_param's
``OFTConfig(side="input")``. Its folder holds, per adapted module,
``base_model.model.<path>.oft_R.weight`` (``nn.Linear``, ``nn.Conv2d``) or
``...oft_embedding_R.weight`` (``nn.Embedding``): ``(blocks, b(b-1)/2)``, the strict upper
triangle of each block's skew-symmetric ``Q`` row by row (one row with ``block_share``). The
config gives either ``oft_block_size`` or ``r`` (the block count), ``use_cayley_neumann``,
``num_cayley_neumann_terms``, ``coft``, ``eps``, ``block_share``, ``bias`` (``"oft_only"`` is
PEFT's name for LoRA's ``"lora_only"``) and ``modules_to_save``. ``module_dropout`` is read
and ignored: PEFT 0.21 never applies it in its forward.

What PEFT cannot hold is refused on export with a ``LoRAError`` saying why: output-side OFT
(LyCORIS / kohya, ``W' = R W``), layers PEFT's OFT does not adapt (Hugging Face ``Conv1D``,
``Conv1d``/``Conv3d``, grouped or dilated convolutions, parameters adapted by name, the
``out_proj`` of ``nn.MultiheadAttention``), and ``k×k`` convolutions with ``k > 1``, whose
unmerged forward in PEFT 0.21 (``unfold`` / rotate / ``fold``, which sums overlapping patches)
does not compute PEFT's own merged weight, even at ``R = I``. Such a convolution in a PEFT
folder is imported as the merged operator ``W Rᵀ`` (what ``merge_and_unload`` gives), with a
warning. PEFT BOFT folders (``peft_type: "BOFT"``) are refused.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.copies import register_copies
from ..core.distributed import full_tensor
from ..core.errors import LoRAError
from ..core.inject import Mode, add_lora
from ..core.lookup import iter_lora
from ..core.merge import remove_lora
from ..variants.oft import OFTConfig, OFTParametrization
from .peft_codecs import FolderFormat, register_peft_folder_format
from .peft_export import _exact_regex, _export_copies, _peft_targets
from .peft_format import PREFIX, module_names
from .peft_import import _glob_escape, _plan_peft_copies

__all__ = ["export_oft_folder", "load_oft_folder"]

_LINEAR_KEY, _EMBEDDING_KEY = "oft_R.weight", "oft_embedding_R.weight"
#: The first PEFT release whose Cayley–Neumann series this module computes (PEFT warns when
#: loading a folder from an older one).
NEUMANN_SINCE = (0, 18, 0)
_OPTIONS = ("cayley_neumann", "neumann_terms", "coft", "eps", "block_share")


def _where(path: str) -> str:
    return f"'{path}'" if path else "the model's root module"


def _check_exportable(module_path: str, module: nn.Module, tensor_name: str, p: Any) -> str:
    """The PEFT key suffix of one adapted module; LoRAError for what PEFT cannot hold."""
    where = _where(f"{module_path}.{tensor_name}" if module_path else tensor_name)
    if p.fields()["side"] != "input":
        raise LoRAError(
            f"adapter {p.adapter!r} on {where} is an output-side OFT adapter (LyCORIS / kohya: "
            "W' = R W, rotating output blocks); PEFT's OFT rotates the input side (W' = W Rᵀ), "
            "another operator. Write it with export_kohya or save_lora."
        )
    if not module_path:
        raise LoRAError(
            f"{where}: PEFT can only adapt submodules. Wrap the layer in a container "
            "(e.g. nn.Sequential(layer)) before add_lora."
        )
    if tensor_name != "weight" or p.kind in ("param", "conv1d_hf"):
        raise LoRAError(
            f"{where} ({p.kind}): PEFT's OFT adapts only nn.Linear, nn.Conv2d and nn.Embedding "
            "layers; export an adapter without it (exclude=...), or save it with save_lora."
        )
    if p.kind == "embedding":
        if module.max_norm is not None:
            raise LoRAError(
                f"{where} renormalizes rows (max_norm={module.max_norm}); PEFT rotates the rows "
                "after renormalizing them, lora_param before: exclude this layer to export."
            )
        return _EMBEDDING_KEY
    if p.kind == "conv":
        if not isinstance(module, nn.Conv2d):
            raise LoRAError(f"{where}: PEFT's OFT adapts nn.Conv2d, not {type(module).__name__}.")
        if module.groups != 1 or any(d != 1 for d in module.dilation):
            raise LoRAError(
                f"{where} is a grouped or dilated convolution, which PEFT's OFT does not adapt; "
                "exclude it to export."
            )
        if any(k != 1 for k in module.kernel_size):
            raise LoRAError(
                f"{where} has kernel {tuple(module.kernel_size)}: PEFT 0.21's unmerged OFT "
                "forward on k×k convolutions (k > 1) folds overlapping patches back and does not "
                "compute its own merged weight W Rᵀ (not even at R = I), so PEFT would give other "
                "outputs. Exclude it to export, or merge_lora and save the merged model."
            )
    return _LINEAR_KEY


def export_oft_folder(model: nn.Module, adapter: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's OFT config fields and tensors for ``adapter`` (keys in full).

    Raises:
        LoRAError: Something PEFT's OFT cannot hold (see the module docstring).
    """
    tensors: dict[str, Tensor] = {}
    owners: dict[str, str] = {}
    entries = []
    for tensor_path, module, tensor_name, p in iter_lora(model):
        if p.adapter != adapter:
            continue
        module_path = tensor_path[: -len(tensor_name)].rstrip(".")
        suffix = _check_exportable(module_path, module, tensor_name, p)
        owners[module_path] = tensor_path
        entries.append((module_path, cast(OFTParametrization, p)))
        tensors[f"{PREFIX}{module_path}.{suffix}"] = full_tensor(p.tensors()["oft_R"])
    mha_out = {
        f"{n}.out_proj" if n else "out_proj"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    ignored = sorted(path for path, _ in entries if path in mha_out)
    if ignored:
        raise LoRAError(
            f"adapter {adapter!r} adapts {ignored}, the out_proj of nn.MultiheadAttention, whose "
            "forward MultiheadAttention never calls: PEFT would silently drop it. Exclude it "
            "(exclude='*.out_proj') to export."
        )
    options = {tuple(p.fields()[k] for k in _OPTIONS) for _, p in entries}
    if len(options) > 1:
        raise LoRAError(
            f"adapter {adapter!r} mixes OFT options {sorted(options)} ({', '.join(_OPTIONS)}) "
            "over its layers; a PEFT OFT config holds one set for the whole adapter."
        )
    neumann, terms, coft, eps, share = next(iter(options))
    sizes = {p.block_size for _, p in entries}
    counts = {p.n_blocks for _, p in entries}
    if len(sizes) == 1:
        r, block_size = 0, next(iter(sizes))
    elif len(counts) == 1:
        r, block_size = next(iter(counts)), 0
    else:
        raise LoRAError(
            f"adapter {adapter!r} has neither one block size nor one block count over its layers "
            f"(block sizes {sorted(sizes)}, counts {sorted(counts)}); PEFT's OFT config sets one "
            "of them for the whole adapter."
        )
    base_names = module_names(model)
    paths = sorted(owners)
    target_modules: list[str] | str = paths
    if {n for n in base_names if _peft_targets(paths, n)} != set(paths):
        target_modules = _exact_regex(paths)
    copies, modules_to_save, bias = _export_copies(model, adapter, owners, base_names)
    tensors.update(copies)
    config = {
        "peft_version": ".".join(map(str, NEUMANN_SINCE)),
        "r": r,
        "oft_block_size": block_size,
        "module_dropout": 0.0,
        "target_modules": target_modules,
        "fan_in_fan_out": False,
        "bias": "oft_only" if bias == "lora_only" else bias,
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": modules_to_save,
        "coft": coft,
        "eps": eps,
        "block_share": share,
        "use_cayley_neumann": neumann,
        "num_cayley_neumann_terms": terms,
    }
    return config, tensors


def _version(text: Any) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(text).partition("@")[0])[:3]
    return tuple(int(p) for p in parts) if parts else (0,)


def _check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The OFT options a PEFT config sets, checked."""
    if "oft_block_size" not in config:
        raise LoRAError(
            "this PEFT OFT folder was written before PEFT 0.14 (no oft_block_size), in a "
            "format PEFT itself no longer loads; retrain it with a newer PEFT."
        )
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "oft_block_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "use_cayley_neumann": lambda v: isinstance(v, bool),
        "num_cayley_neumann_terms": lambda v: (
            isinstance(v, int) and not isinstance(v, bool) and v >= 1
        ),
        "coft": lambda v: isinstance(v, bool),
        "eps": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "block_share": lambda v: isinstance(v, bool),
        "bias": lambda v: v in ("none", "all", "oft_only", None),
    }
    for field, ok in checks.items():
        if field in config and not ok(config[field]):
            raise LoRAError(f"the PEFT OFT config has an invalid {field}={config[field]!r}.")
    if bool(config.get("r", 0)) == bool(config.get("oft_block_size", 32)):
        raise LoRAError(
            "the PEFT OFT config must set exactly one of r and oft_block_size, got "
            f"r={config.get('r')!r}, oft_block_size={config.get('oft_block_size')!r}."
        )
    neumann = config.get("use_cayley_neumann", True)
    if neumann and _version(config.get("peft_version", "0")) < NEUMANN_SINCE:
        warnings.warn(
            "this PEFT OFT folder was written before PEFT 0.18, whose Cayley–Neumann series "
            "changed; it is computed with the current series (as PEFT 0.18+ loads it).",
            stacklevel=4,
        )
    return {
        "side": "input",
        "cayley_neumann": bool(neumann),
        "neumann_terms": int(config.get("num_cayley_neumann_terms", 5)),
        "coft": bool(config.get("coft", False)),
        "eps": float(config.get("eps", 6e-5)),
        "block_share": bool(config.get("block_share", False)),
    }


def _block_size(stored: Tensor, where: str) -> int:
    """``b`` from ``b(b-1)/2`` elements per row."""
    m = int(stored.shape[1]) if stored.dim() == 2 else -1
    b = (1 + math.isqrt(1 + 8 * m)) // 2 if m >= 0 else 0
    if stored.dim() != 2 or stored.shape[0] == 0 or b * (b - 1) // 2 != m or b < 2:
        raise LoRAError(
            f"{where} has shape {tuple(stored.shape)}; PEFT's OFT stores (blocks, b(b-1)/2) with "
            "a block size b >= 2."
        )
    return b


def _rotated_features(module: nn.Module, where: str) -> tuple[int, bool]:
    """The input features PEFT's OFT rotates, and whether the layer is a k×k conv (k > 1)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, False
    if isinstance(module, nn.Linear):
        return module.in_features, False
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or any(d != 1 for d in module.dilation):
            raise LoRAError(
                f"{where} is a grouped or dilated convolution, which PEFT's OFT refuses."
            )
        kernel = module.kernel_size
        return module.in_channels * math.prod(kernel), any(k != 1 for k in kernel)
    raise LoRAError(
        f"{where} is a {type(module).__name__}; PEFT's OFT adapts nn.Linear, nn.Conv2d and "
        "nn.Embedding."
    )


def load_oft_folder(
    model: nn.Module,
    config: Mapping[str, Any],
    raw: Mapping[str, Tensor],
    adapter: str,
    freeze: bool,
    mode: Mode,
) -> None:
    """Add the OFT adapter of a PEFT folder to ``model``: all checked first, then all or nothing."""
    options = _check_config(config)
    share = options["block_share"]
    modules = dict(model.named_modules())
    found: dict[str, tuple[int, Tensor]] = {}  # module path -> (block size, stored tensor)
    extras: dict[str, Tensor] = {}
    wide: list[str] = []
    for key, tensor in raw.items():
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if ".oft_r." in f".{stripped}":
            raise LoRAError(
                f"'{key}' is an OFT tensor of PEFT < 0.14, a format PEFT itself no longer loads."
            )
        suffix = next(
            (s for s in (_LINEAR_KEY, _EMBEDDING_KEY) if stripped.endswith("." + s)), None
        )
        if suffix is None:
            extras[stripped] = tensor
            continue
        path = stripped[: -len(suffix) - 1]
        module = modules.get(path)
        where = f"'{key}'"
        if module is None or not path:
            raise LoRAError(
                f"{where} adapts '{path}', which this model does not have; is this the base "
                "model the adapter was trained on?"
            )
        if (suffix == _EMBEDDING_KEY) != isinstance(module, nn.Embedding):
            raise LoRAError(f"{where} does not fit '{path}', a {type(module).__name__}.")
        features, k_by_k = _rotated_features(module, f"'{path}'")
        b = _block_size(tensor, where)
        blocks = features // b
        if features % b or tensor.shape[0] != (1 if share else blocks):
            raise LoRAError(
                f"{where} has shape {tuple(tensor.shape)}, but '{path}' rotates {features} input "
                f"features; expected ({1 if share else 'features / b'}, b(b-1)/2). Is this the "
                "base model the adapter was trained on?"
            )
        if k_by_k:
            wide.append(path)
        found[path] = (b, tensor)
    if not found:
        raise LoRAError("the PEFT OFT folder holds no oft_R / oft_embedding_R tensors.")
    copies = _plan_peft_copies(model, config, extras, set(found), Path("PEFT OFT folder"))
    if wide:
        warnings.warn(
            f"PEFT's unmerged OFT forward on k×k convolutions {sorted(wide)[:5]} does not compute "
            "its own merged weight; lora_param computes the merged operator W Rᵀ (what PEFT's "
            "merge_and_unload gives).",
            stacklevel=3,
        )
    targets = {_glob_escape(path): b for path, (b, _) in found.items()}
    add_lora(
        model,
        list(targets),
        rank=targets,
        adapter=adapter,
        freeze=freeze,
        mode=mode,
        variant=OFTConfig(**options),
    )
    try:
        with torch.no_grad():
            for tensor_path, _, _, p in iter_lora(model):
                if p.adapter == adapter:
                    stored = found[tensor_path.rpartition(".")[0]][1]
                    p.tensors()["oft_R"].copy_(stored)
        register_copies([plan for plan, _ in copies], adapter, {p.path: v for p, v in copies})
    except BaseException:
        remove_lora(model, adapter)
        raise


def _refuse_boft(*args: Any) -> Any:
    raise LoRAError(
        "this is a PEFT BOFT (butterfly OFT) folder: its rotation is a product of butterfly-"
        "permuted block-diagonal factors, which lora_param does not implement (OFT's single "
        "block-diagonal rotation is OFTConfig); it cannot be imported."
    )


register_peft_folder_format(FolderFormat("OFT", "oft", export_oft_folder, load_oft_folder))
register_peft_folder_format(FolderFormat("BOFT", "", _refuse_boft, _refuse_boft))
