"""Which tensors of which layers can carry an adapter, and how they are seen as matrices.

Besides the layers described here (``nn.Linear``, convolutions, embeddings, Hugging Face
``Conv1D``, ``nn.MultiheadAttention``'s projections, mixture-of-experts blocks and any tensor
named explicitly), plug-ins describe layers of their own with :func:`register_target_provider`
(:mod:`lora_param.quant` does so for bitsandbytes' quantized layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distributed import holds_shards
from .errors import LoRAError
from .generated_class import class_before_parametrizations
from .layer_ops import LayerKind
from .store import BaseStore

__all__ = [
    "SUPPORTED_LAYERS",
    "AdaptTarget",
    "ExpertLayout",
    "LayerSpec",
    "TargetProvider",
    "base_tensor",
    "expert_tensor_names",
    "expert_transposed",
    "is_experts_module",
    "is_hf_conv1d",
    "join",
    "layer_kind",
    "module_targets",
    "parameter_target",
    "parametrization_list",
    "register_target_provider",
    "tensor_names",
]

SUPPORTED_LAYERS = (
    "nn.Linear (and subclasses), nn.Conv1d/2d/3d (groups included), nn.Embedding, "
    "nn.MultiheadAttention (its in-projection weights), Hugging Face Conv1D, "
    "mixture-of-experts blocks (their 3-D expert tensors, one LoRA per expert)"
)


ExpertLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class LayerSpec:
    """A tensor seen as a matrix: what an adapter needs to know about the tensor it adapts.

    Attributes:
        kind: Layer kind (``"linear"``, ``"conv"``, ``"embedding"``, ``"conv1d_hf"``,
            ``"param"``, ``"experts"``).
        shape: Shape of the tensor.
        fan_in: Columns of the matrix view (one expert's, for ``"experts"``).
        fan_out: Rows of the matrix view (one expert's, for ``"experts"``).
        fan_in_fan_out: The tensor is stored transposed, ``(fan_in, fan_out)`` (Hugging Face
            ``Conv1D``; ``(experts, in, out)`` expert tensors).
    """

    kind: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    fan_in_fan_out: bool = False

    @property
    def experts(self) -> int:
        """Number of experts of a 3-D expert tensor (1 otherwise)."""
        return int(self.shape[0]) if self.kind == "experts" else 1

    def fields(self) -> dict[str, object]:
        """The spec as adapter-file fields."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "fan_in": self.fan_in,
            "fan_out": self.fan_out,
            "fan_in_fan_out": self.fan_in_fan_out,
        }


@dataclass(frozen=True)
class AdaptTarget:
    """One tensor that will carry an adapter, with its matrix view.

    Attributes:
        path: Qualified tensor name, ``"<module path>.<parameter name>"``.
        module_name: Qualified name of the module owning the tensor.
        module: That module.
        param_name: Name of the tensor inside the module (``"weight"``, ``"in_proj_weight"``).
        kind: Layer kind, which decides the factored forward.
        fan_in: Columns of the matrix view.
        fan_out: Rows of the matrix view.
        fan_in_fan_out: The tensor is stored transposed, ``(fan_in, fan_out)``.
        shape: Shape of the tensor.
    """

    path: str
    module_name: str
    module: nn.Module
    param_name: str
    kind: LayerKind
    fan_in: int
    fan_out: int
    fan_in_fan_out: bool
    shape: tuple[int, ...]

    @property
    def spec(self) -> LayerSpec:
        """The tensor seen as a matrix."""
        return LayerSpec(self.kind, self.shape, self.fan_in, self.fan_out, self.fan_in_fan_out)


def join(prefix: str, name: str) -> str:
    """Join a module path and a child name the way ``named_modules`` does."""
    return f"{prefix}.{name}" if prefix else name


def parametrization_list(module: nn.Module, tensor_name: str) -> parametrize.ParametrizationList:
    """The parametrization list of one tensor (typed, for mypy)."""
    lists = cast(nn.ModuleDict, module.parametrizations)
    return cast(parametrize.ParametrizationList, lists[tensor_name])


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (weight stored (in, out)), no transformers import."""
    cls = class_before_parametrizations(module)
    return cls.__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a layer whose ``weight`` LoRA adapts, or None for other modules."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_hf_conv1d(module):
        return "conv1d_hf"
    return None


def tensor_names(module: nn.Module) -> list[str]:
    """Names of the module's own parameters, parametrized ones included."""
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        lists = cast(nn.ModuleDict, module.parametrizations)
        names += [n for n in lists if n not in names]
    return names


def base_tensor(module: nn.Module, name: str) -> Tensor:
    """The tensor under ``name`` before any parametrization (``original`` if parametrized).

    A packed weight sharded by FSDP2 cannot be read outside a forward: a ``meta`` tensor of
    its shape and compute dtype stands for it (the callers that would change it refuse).
    """
    if parametrize.is_parametrized(module, name):
        plist = parametrization_list(module, name)
        if plist.is_tensor:
            return plist.original
        head = plist[0]
        if isinstance(head, BaseStore) and holds_shards(module, name):
            return torch.empty(head.shape, dtype=head.compute_dtype, device="meta")
        with torch.no_grad():
            return getattr(module, name)
    return getattr(module, name)


def is_experts_module(module: nn.Module) -> bool:
    """True for a mixture-of-experts block holding its experts as 3-D parameters.

    transformers' experts classes (``@use_experts_implementation``) carry ``is_transposed``;
    other classes qualify by a name containing ``Expert``.
    """
    cls = class_before_parametrizations(module)
    if not (hasattr(module, "is_transposed") or "Expert" in cls.__name__):
        return False
    return bool(expert_tensor_names(module))


def expert_tensor_names(module: nn.Module) -> list[str]:
    """The module's own 3-D floating-point parameters (parametrized ones included)."""
    names = []
    for name in tensor_names(module):
        tensor = base_tensor(module, name)
        if tensor is not None and tensor.dim() == 3 and tensor.is_floating_point():
            names.append(name)
    return names


def expert_transposed(module: nn.Module, path: str, layout: ExpertLayout | None) -> bool:
    """Whether a 3-D expert tensor is stored ``(experts, in, out)``.

    Args:
        module: The module owning the tensor.
        path: The tensor's path (for error messages).
        layout: ``"out_in"``, ``"in_out"``, or None to follow the module's ``is_transposed``
            flag (absent: ``"out_in"``, as ``F.linear(x, W[e])`` reads it).
    """
    if layout is None:
        return bool(getattr(module, "is_transposed", False))
    if layout not in ("out_in", "in_out"):
        raise LoRAError(
            f"expert_layout for '{path}' must be 'out_in', 'in_out' or None (follow the "
            f"module's is_transposed flag), got {layout!r}."
        )
    return layout == "in_out"


def _check_tensor(path: str, tensor: Tensor | None) -> None:
    if tensor is None:
        raise LoRAError(f"'{path}' is None; there is no weight to adapt.")
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise LoRAError(
            f"'{path}' is not initialized yet (a lazy module); run one forward pass first."
        )
    if not tensor.is_floating_point():
        raise LoRAError(f"'{path}' has dtype {tensor.dtype}; LoRA needs a floating-point tensor.")
    if tensor.dim() < 2:
        raise LoRAError(
            f"'{path}' is {tensor.dim()}-D with shape {tuple(tensor.shape)}; LoRA needs a tensor "
            "with at least 2 dimensions (a matrix over its first dimension). "
            "Mark 1-D parameters such as biases or norms trainable instead (trainable=, bias=)."
        )


def _make(
    module_name: str, module: nn.Module, name: str, kind: LayerKind, fan_in_fan_out: bool = False
) -> AdaptTarget:
    path = join(module_name, name)
    tensor = base_tensor(module, name)
    _check_tensor(path, tensor)
    shape = tuple(tensor.shape)
    if kind == "experts":
        fan_in, fan_out = (shape[1], shape[2]) if fan_in_fan_out else (shape[2], shape[1])
    elif fan_in_fan_out:
        fan_in, fan_out = shape[0], math.prod(shape[1:])
    else:
        fan_out, fan_in = shape[0], math.prod(shape[1:])
    return AdaptTarget(
        path, module_name, module, name, kind, fan_in, fan_out, fan_in_fan_out, shape
    )


def _expert_target(
    module_name: str, module: nn.Module, name: str, layout: ExpertLayout | None
) -> AdaptTarget:
    transposed = expert_transposed(module, join(module_name, name), layout)
    return _make(module_name, module, name, "experts", fan_in_fan_out=transposed)


#: ``(module name, module) -> targets or None``: describes layers the core does not know.
TargetProvider = Callable[[str, nn.Module], "list[AdaptTarget] | None"]
_PROVIDERS: list[TargetProvider] = []


def register_target_provider(provider: TargetProvider) -> None:
    """Let a plug-in describe the adaptable tensors of layers of its own (asked first)."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def module_targets(
    module_name: str, module: nn.Module, expert_layout: ExpertLayout | None = None
) -> list[AdaptTarget] | None:
    """The tensors an adapter goes on in a layer, or None when the layer type is not supported.

    A mixture-of-experts block gives its 3-D expert tensors, laid out as ``expert_layout``
    says (None: the block's ``is_transposed`` flag).
    """
    for provider in _PROVIDERS:
        provided = provider(module_name, module)
        if provided is not None:
            return provided
    kind = layer_kind(module)
    if kind is not None:
        return [_make(module_name, module, "weight", kind, fan_in_fan_out=kind == "conv1d_hf")]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            names = ["in_proj_weight"]
        else:
            names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [_make(module_name, module, n, "param") for n in names]
    if is_experts_module(module):
        return [
            _expert_target(module_name, module, n, expert_layout)
            for n in expert_tensor_names(module)
        ]
    return None


def parameter_target(
    module_name: str, module: nn.Module, name: str, expert_layout: ExpertLayout | None = None
) -> AdaptTarget:
    """A tensor named explicitly: a supported layer's weight keeps its kind, others are matrices.

    A layer a plug-in describes (a bitsandbytes layer) keeps its description. A 3-D
    floating-point tensor outside a supported layer is a stack of experts: one LoRA per
    expert along its first dimension (see :mod:`lora_param.variants.experts`).
    """
    for provider in _PROVIDERS:
        provided = provider(module_name, module)
        if provided is not None:
            for target in provided:
                if target.param_name == name:
                    return target
    kind = layer_kind(module) if name == "weight" else None
    if kind is not None:
        return _make(module_name, module, name, kind, fan_in_fan_out=kind == "conv1d_hf")
    if name in expert_tensor_names(module):
        return _expert_target(module_name, module, name, expert_layout)
    return _make(module_name, module, name, "param")
