"""The layer-kind and base-store axes: one tiny model per layer kind, its base store applied.

Every model is ``Net``: a ``body`` holding the adapted tensor, then a ``head`` (``nn.Linear``)
that ``trainable=["head"]`` trains in full. Inputs have a batch of 3 rows, each row
independent of the others (mixed batches route rows). Weights come from a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_param as lp

__all__ = [
    "BATCH",
    "KINDS",
    "STORES",
    "Experts",
    "KindSpec",
    "Net",
    "ParamHolder",
    "applicable",
    "bnb_dequantized",
    "build_base",
    "build_plain",
    "dequantized",
    "needs",
]

BATCH = 3


class ParamHolder(nn.Module):
    """A module using a matrix parameter through ``torch.matmul`` (adapted by naming it)."""

    def __init__(self) -> None:
        super().__init__()
        self.my_param = nn.Parameter(torch.randn(8, 6) * 0.3)
        self.offset = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.my_param) + self.offset


class Experts(nn.Module):
    """A mixture-of-experts block holding its experts as one 3-D tensor ``(E, out, in)``.

    Row ``i`` of the batch goes to expert ``i % E``, as a router would send it.
    """

    def __init__(self, experts: int = 2, d_in: int = 8, d_out: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_out, d_in) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.arange(x.shape[0], device=x.device) % self.weight.shape[0]
        return torch.bmm(self.weight[e], x.unsqueeze(-1)).squeeze(-1)


class Net(nn.Module):
    """``head(features(body(x)))``: the adapted body, then a trainable head."""

    def __init__(self, kind: str, body: nn.Module, d_out: int) -> None:
        super().__init__()
        self.kind = kind
        self.body = body
        self.head = nn.Linear(d_out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("mha"):
            h = self.body(x, x, x, need_weights=False)[0]
        else:
            h = self.body(x)
        if h.dim() == 4:  # conv: (N, C, H, W) -> (N, H, W, C), rows stay independent
            h = h.permute(0, 2, 3, 1)
        return self.head(torch.tanh(h))


def _hf_conv1d() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(6, 8)


def _randn(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(BATCH, *shape, generator=g)


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 10, (BATCH, 5), generator=g)


@dataclass(frozen=True)
class KindSpec:
    """One value of the layer-kind axis.

    Attributes:
        name: Axis value.
        body: Builds the module holding the adapted tensor.
        d_out: Features the body gives the head.
        inputs: Builds the input from a generator.
        targets: ``targets=`` for add_lora.
        tensor: Path of the adapted tensor, from the model root.
        packable: ``quantize_base`` can store the tensor packed.
        optional: Module an optional dependency provides (skip when missing).
    """

    name: str
    body: Callable[[], nn.Module]
    d_out: int
    inputs: Callable[[torch.Generator], torch.Tensor]
    targets: list[str]
    tensor: str
    packable: bool
    optional: str | None = None


def _kind(name, body, d_out, inputs, targets, tensor, packable, optional=None) -> KindSpec:
    return KindSpec(name, body, d_out, inputs, targets, tensor, packable, optional)


KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in [
        _kind("linear", lambda: nn.Linear(8, 6), 6, _randn(8), ["body"], "body.weight", True),
        _kind(
            "conv2d",
            lambda: nn.Conv2d(4, 6, 3, padding=1),
            6,
            _randn(4, 5, 5),
            ["body"],
            "body.weight",
            True,
        ),
        _kind(
            "conv2d_grouped",
            lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
            6,
            _randn(4, 5, 5),
            ["body"],
            "body.weight",
            True,
        ),
        _kind("embedding", lambda: nn.Embedding(10, 6), 6, _ids, ["body"], "body.weight", True),
        _kind("hf_conv1d", _hf_conv1d, 6, _randn(8), ["body"], "body.weight", True, "transformers"),
        _kind(
            "mha_in_proj",
            lambda: nn.MultiheadAttention(8, 2, batch_first=True),
            8,
            _randn(4, 8),
            ["body"],
            "body.in_proj_weight",
            False,
        ),
        _kind(
            "mha_out_proj",
            lambda: nn.MultiheadAttention(8, 2, batch_first=True),
            8,
            _randn(4, 8),
            ["body.out_proj"],
            "body.out_proj.weight",
            True,
        ),
        _kind("experts", Experts, 6, _randn(8), ["body"], "body.weight", False),
        _kind("param", ParamHolder, 6, _randn(8), ["body.my_param"], "body.my_param", False),
    ]
}

#: Base stores: how the frozen weight is kept. bitsandbytes layers exist for Linear only.
STORES = ["plain", "nf4", "int8", "bnb4", "bnb8"]
BNB_STORES = ("bnb4", "bnb8")


def needs(store: str, kind: str) -> list[str]:
    """Optional packages a (store, kind) model needs."""
    out = []
    if store in BNB_STORES:
        out.append("bitsandbytes")
    if KINDS[kind].optional:
        out.append(KINDS[kind].optional)
    return out


def applicable(store: str, kind: str) -> bool:
    """bitsandbytes' layers are Linear layers: the bnb stores exist for ``linear`` only."""
    return store not in BNB_STORES or kind == "linear"


def build_plain(kind: str, seed: int = 0) -> Net:
    """The float32 model, weights from ``seed``."""
    torch.manual_seed(seed)
    spec = KINDS[kind]
    return Net(kind, spec.body(), spec.d_out)


def _bnb_linear(dense: nn.Linear, store: str) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    if store == "bnb4":
        layer = bnb.nn.Linear4bit(
            dense.in_features, dense.out_features, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            dense.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        layer.bias = nn.Parameter(dense.bias.data.clone())
    else:
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def build_base(kind: str, store: str, seed: int = 0) -> Net:
    """The base model for a cell: the plain model with its body's weight stored as ``store``.

    ``nf4`` and ``int8`` pack with :func:`lora_param.quantize_base` (``add_lora(quantize=...)``
    must pack the same way: the cells compare the two); ``bnb4``/``bnb8`` replace the Linear
    body by a bitsandbytes layer. Raises LoRAError where the store cannot hold the tensor.
    """
    for package in needs(store, kind):
        pytest.importorskip(package)
    model = build_plain(kind, seed)
    if store in ("nf4", "int8"):
        lp.quantize_base(model, [KINDS[kind].targets[0]], method=store)
    elif store in BNB_STORES:
        model.body = _bnb_linear(model.body, store)
    model.requires_grad_(False)
    return model


def dequantized(base: Net, kind: str, store: str) -> torch.Tensor:
    """The base weight the model computes with, read without lora_param where possible.

    bitsandbytes layers are dequantized by bitsandbytes' own functions; NF4/int8 weights are
    read from the base model (no adapter on it: the store's dequantization, which the
    "lora_off" cells compare bit for bit with the model's own forward).
    """
    owner_path, _, name = KINDS[kind].tensor.rpartition(".")
    owner = base.get_submodule(owner_path)
    if store in BNB_STORES:
        return bnb_dequantized(owner, store)
    with torch.no_grad():
        return getattr(owner, name).detach().clone()


def bnb_dequantized(layer: nn.Module, store: str) -> torch.Tensor:
    """A bitsandbytes layer's weight (under adapters or not), by bitsandbytes' own functions."""
    import bitsandbytes as bnb

    if parametrize.is_parametrized(layer, "weight"):
        w = layer.parametrizations.weight.original
    else:
        w = layer.weight
    with torch.no_grad():
        if store == "bnb4":
            return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return w.data.float() * scb.float().view(-1, 1) / 127.0
