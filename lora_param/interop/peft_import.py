"""Load a PEFT LoRA adapter folder into a model as lora_param adapters (``import_peft``).

The layouts are described in :mod:`lora_param.interop.peft_format`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.copies import (
    CopyPlan,
    CopyRole,
    check_copyable,
    register_copies,
)
from ..core.distributed import IMPORT_BEFORE_SHARDING, refuse_sharded
from ..core.errors import LoRAError
from ..core.inject import Mode, add_lora
from ..core.lookup import iter_lora, list_adapters
from ..core.merge import remove_lora
from ..core.targets import base_tensor, is_hf_conv1d, module_targets, tensor_names
from .peft_codecs import codec_for_config, folder_format
from .peft_format import (
    CONFIG_NAME,
    PREFIX,
    module_names,
    peft_pattern_key,
    unwrap_model,
)
from .peft_params import (
    BASE_LAYER,
    experts_from_peft,
    split_wrappers,
    wrapper_depths,
)
from .peft_read import check_config, check_field_types, read_folder

__all__ = ["import_peft"]


def _our_factors(layout: str, pa: Tensor, pb: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """PEFT's factors (shapes already checked) in lora_param's (rank, fan_in) / (fan_out, rank)."""
    if layout == "embedding":
        return pb.t(), pa.t()
    if layout == "layer":
        return pa.reshape(rank, -1), pb.reshape(pb.shape[0], rank)
    return pa, pb


def _split_key(key: str, extra: tuple[str, ...]) -> tuple[str, str]:
    for suffix in (
        "lora_A.weight",
        "lora_B.weight",
        "lora_embedding_A",
        "lora_embedding_B",
        *extra,
    ):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def _glob_escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


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
            trainable tokens, ...), a layer missing from the model, or shapes that do not match,
            a sharded (FSDP2) model (import before ``fully_shard``); the model is left
            unchanged.
    """

    path = Path(directory)
    config, raw = read_folder(path)
    target = unwrap_model(model)
    refuse_sharded(target, "import_peft", IMPORT_BEFORE_SHARDING)
    fmt = folder_format(peft_type=str(config.get("peft_type")))
    if fmt is not None and fmt.peft_type != "LORA":
        if adapter in list_adapters(target):
            raise LoRAError(
                f"the model already has an adapter named {adapter!r}; pass another adapter=."
            )
        fmt.load(target, config, raw, adapter, freeze, mode)
        return model
    check_field_types(config, path / CONFIG_NAME)
    check_config(config, path)
    if adapter in list_adapters(target):
        raise LoRAError(
            f"the model already has an adapter named {adapter!r}; pass another adapter=."
        )

    codec = codec_for_config(config)
    known_extra = ("lora_magnitude_vector", *codec.extra_keys)
    groups: dict[tuple[str, int], dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, t in raw.items():
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        wrapped_path, part = _split_key(stripped, tuple(dict.fromkeys(known_extra)))
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
    variant_extra: dict[str, dict[str, Tensor]] = {}

    plan = []  # (tensor path, module path, A (our layout), B (our layout), rank, alpha)
    by_name: set[str] = set()  # tensors adapted through target_parameters
    for (module_path, depth), parts in groups.items():
        module = modules.get(module_path) if module_path else None
        if module is None:
            raise LoRAError(
                f"'{path}' adapts '{module_path}', which this model does not have; "
                "is this the base model the adapter was trained on?"
            )
        extra = {k: parts.pop(k) for k in list(parts) if k in known_extra}
        if set(extra) != set(codec.extra_keys):
            raise LoRAError(
                f"'{path}': layer '{module_path}' has the tensors {sorted(extra)} besides its "
                f"factors, but the config describes a {codec.variant} adapter, which has "
                f"{sorted(codec.extra_keys)} (use_dora={config.get('use_dora', False)})."
            )
        variant_extra[module_path] = extra
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
                # the layer's own description: a packed (bitsandbytes) weight is (out, in) too
                linear = module_targets(module_path, module)
                assert linear is not None
                out_f, in_f = linear[0].fan_out, linear[0].fan_in
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
        alpha_key = peft_pattern_key(alpha_pattern, key)
        alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else alpha_default
        rank_key = peft_pattern_key(rank_pattern, key)
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
        **codec.add_lora_options(config),
    )
    loaded = set()
    factors = {tp: (a, b) for tp, _, a, b, _, _ in plan}
    with torch.no_grad():
        for tensor_path, _module, _name, p in iter_lora(target):
            if p.adapter != adapter or tensor_path not in wanted:
                continue
            a, b = factors[tensor_path]
            own = p.tensors()
            own["lora_A"].copy_(a.reshape(own["lora_A"].shape))
            own["lora_B"].copy_(b.reshape(own["lora_B"].shape))
            module_path = tensor_path.rpartition(".")[0]
            codec.import_extra(p, variant_extra.get(module_path, {}), f"'{path}': '{module_path}'")
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
    names = [n for n in module_names(model) if n]
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
