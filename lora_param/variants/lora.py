"""`LoRAParametrization`: the module registered on a weight by torch.nn.utils.parametrize."""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

__all__ = ["AUTO_EVAL_CACHE_MAX_NUMEL", "Init", "LayerKind", "LoRAParametrization"]

#: The default ("auto") eval-cache rule keeps ``W + sBA`` only for weights of at most this many
#: elements (3 Mi): there the cache makes evaluation as fast as the merged model (the factored
#: ``base(x) + s*B(A x)`` measured 1.09x / 1.11x merged on 1536-wide and 512x512x3x3 layers of
#: 2.36 M elements), while an LLM's projections (2048 x 2048 = 4 Mi and up) stay factored: a
#: cached copy would add a whole weight's memory per layer (see ``lora_param.core.eval_cache``).
AUTO_EVAL_CACHE_MAX_NUMEL = 3 << 20

LayerKind = Literal["linear", "conv", "embedding", "conv1d_hf", "param", "experts"]
Init = Literal["kaiming", "gaussian"]


class LoRAParametrization(nn.Module):
    """Adds a low-rank update ``scale * B @ A`` to the weight it is registered on.

    The weight is seen as a matrix ``(fan_out, fan_in)`` over its first dimension (a conv
    weight ``(out, in/groups, *k)`` becomes ``(out, in/groups * prod(k))``); with
    ``fan_in_fan_out`` it is stored transposed, ``(fan_in, fan_out)``, as Hugging Face's
    ``Conv1D`` does. ``B`` starts at zero, so registering it leaves the model unchanged.

    Under ``torch.no_grad()`` the result is cached, when ``eval_cache`` is true, and reused
    until the input weight, ``A``, ``B``, ``scale`` or ``enabled`` change (tensor version
    counters are checked), so evaluation with LoRA on costs what the merged model costs.
    ``eval_cache`` starts true for weights of at most ``AUTO_EVAL_CACHE_MAX_NUMEL`` elements;
    ``set_eval_cache`` chooses per model.

    Args:
        fan_in: Columns of the weight matrix (``A`` is ``(rank, fan_in)``).
        fan_out: Rows of the weight matrix (``B`` is ``(fan_out, rank)``).
        weight_shape: Shape of the weight the update is reshaped to.
        rank: Rank of the update.
        alpha: Scaling numerator; ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        adapter: Name of the adapter this update belongs to.
        kind: Layer kind the weight belongs to (decides the factored forward, if any).
        dropout: Dropout probability on the layer input (factored path) or on the input
            features of ``A`` (materialized path).
        init: ``"kaiming"`` (uniform, as loralib/PEFT; N(0, 1) for embeddings, as PEFT) or
            ``"gaussian"`` (A ~ N(0, 1), as the well-known tutorial) for ``A``.
        use_rslora: Use ``alpha / sqrt(rank)`` as the scale.
        fan_in_fan_out: The weight is stored ``(fan_in, fan_out)``.
        device: Device of ``A`` and ``B`` (the weight's).
        dtype: Dtype of ``A`` and ``B`` (the weight's).
    """

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        weight_shape: tuple[int, ...],
        *,
        rank: int = 4,
        alpha: float | None = None,
        adapter: str = "default",
        kind: LayerKind = "param",
        dropout: float = 0.0,
        init: Init = "kaiming",
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        alpha = float(rank if alpha is None else alpha)
        self.fan_in, self.fan_out, self.rank, self.alpha = fan_in, fan_out, rank, alpha
        self.weight_shape = tuple(weight_shape)
        self.adapter, self.kind, self.init = adapter, kind, init
        self.use_rslora, self.fan_in_fan_out = use_rslora, fan_in_fan_out
        self.dropout_p = float(dropout)
        self.scale = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank, device=device, dtype=dtype))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._enabled = True
        self._requires_grad_when_enabled = (True, True)
        self._cache: tuple | None = None  # (weight, A, B, stamp, weight + update)
        self.eval_cache = math.prod(self.weight_shape) <= AUTO_EVAL_CACHE_MAX_NUMEL
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``A`` anew with the chosen init and set ``B`` to zero (the update becomes zero).

        For embeddings ``A`` is always N(0, 1), as PEFT: PEFT zeroes ``lora_embedding_A`` and
        draws ``lora_embedding_B`` N(0, 1), which are this layout's ``B`` and ``A`` transposed.
        """
        with torch.no_grad():
            if self.init == "gaussian" or self.kind == "embedding":
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    @property
    def enabled(self) -> bool:
        """Whether the update is applied.

        A disabled adapter is also frozen (no gradient, nothing unused for DDP); enabling it
        again restores the ``requires_grad`` flags A and B had (a frozen A stays frozen).
        """
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        value = bool(value)
        if value == self._enabled:
            return
        if value:
            grad_a, grad_b = self._requires_grad_when_enabled
        else:
            self._requires_grad_when_enabled = (
                self.lora_A.requires_grad,
                self.lora_B.requires_grad,
            )
            grad_a = grad_b = False
        self.lora_A.requires_grad_(grad_a)
        self.lora_B.requires_grad_(grad_b)
        self._enabled = value
        self._cache = None

    def delta(self) -> Tensor:
        """The update ``scale * B @ A`` in the weight's own layout and shape."""
        return self.add_update(self.lora_B.new_zeros(self.weight_shape), dropout=False)

    def add_update(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + scale * B @ A`` whether enabled or not; ``dropout`` masks A's inputs."""
        lora_a = self.lora_A
        if dropout and self.dropout_p > 0 and self.training:
            lora_a = lora_a * self.dropout(torch.ones_like(lora_a[:1]))
        lora_b, scale = self.lora_B, self.scale
        if isinstance(scale, Tensor):  # hot-swap-ready (routing.hotswap): alpha takes numbers only
            lora_b, scale = lora_b * scale, 1.0
        if self.fan_in_fan_out:
            return torch.addmm(weight, lora_a.t(), lora_b.t(), alpha=scale)
        matrix = weight.reshape(self.fan_out, self.fan_in)
        return torch.addmm(matrix, lora_b, lora_a, alpha=scale).view(weight.shape)

    def clear_cache(self) -> None:
        """Forget the cached weight (needed only after edits through ``.data``)."""
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to() / .half() swap tensor data without bumping version counters: drop the cache.
        self._cache = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> LoRAParametrization:
        """Set train/eval mode, dropping the cache (``model.eval()`` always starts fresh)."""
        self._cache = None
        return super().train(mode)

    def forward(self, weight: Tensor) -> Tensor:
        """Return ``weight + scale * B @ A`` (or ``weight`` itself when disabled)."""
        if not self._enabled:
            return weight
        if torch.compiler.is_compiling():
            return self.add_update(weight, dropout=True)
        if torch.is_grad_enabled() or (self.training and self.dropout_p > 0):
            self._cache = None
            return self.add_update(weight, dropout=True)
        if not self.eval_cache:
            self._cache = None
            return self.add_update(weight)
        # The cache holds the tensors themselves, so identity checks are safe (no id reuse);
        # versions catch in-place updates (optimizer steps, copy_), data_ptr catches `.data =`.
        a, b = cast(Tensor, self._parameters["lora_A"]), cast(Tensor, self._parameters["lora_B"])
        stamp = (
            weight._version,
            weight.data_ptr(),
            a._version,
            a.data_ptr(),
            b._version,
            b.data_ptr(),
            self.scale,
        )
        cache = self._cache
        if (
            cache is not None
            and cache[0] is weight
            and cache[1] is a
            and cache[2] is b
            and cache[3] == stamp
        ):
            return cache[4]
        out = self.add_update(weight)
        self._cache = (weight, a, b, stamp, out)
        return out

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, kind={self.kind}, fan_in={self.fan_in}, "
            f"fan_out={self.fan_out}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, enabled={self._enabled}"
        )
