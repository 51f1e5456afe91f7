"""Shared fixtures for the core test suite: deterministic seeds and a zoo of tiny models.

The zoo is one list of ``Case`` objects (see ``CASES``), modelled on PEFT's
``tests/test_custom_models.py``: every behaviour test runs over every case, and over both
``mode="factored"`` and ``mode="materialized"``. Tests never import this file; they get
``case`` (a :class:`Case`), ``mode`` and the helpers through fixtures, so that the
parametrization ids (``test_x[mlp-factored]``) stay readable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize


def pytest_addoption(parser):
    parser.addoption(
        "--cross-product",
        choices=["subset", "full"],
        default="subset",
        help="tests/test_cross_product.py: a covering subset (default) or the full product",
    )


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request):
    """Tiny shapes run several times faster on one intra-op thread (no oversubscription on a
    2-core machine). A module that trains real models sets ``ALL_THREADS = True``."""
    if getattr(request.module, "ALL_THREADS", False):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- tiny models


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, d_hidden: int = 8, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv1d(6, 4, 3, stride=2)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv(x)))


class ConvNet2d(nn.Module):
    """A plain conv, a grouped conv (groups=3) and a depthwise conv with reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, groups=3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect")
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        x = torch.tanh(self.grouped(x))
        x = torch.tanh(self.depthwise(x))
        return self.head(x)


class ConvNet3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 2, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv3d(4, 3, 2)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv(x)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        return self.head(self.emb(idx))


class MHANet(nn.Module):
    """Self-attention with a packed ``in_proj_weight``; ``out_proj`` is read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class MHAKdimNet(nn.Module):
    """kdim/vdim != embed_dim: separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


class TransformerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02 * 10)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class HFConv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(9, 6)
        self.c_proj = Conv1D(4, 9)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


class ParamHolder(nn.Module):
    """A module with a custom matrix parameter used through ``torch.matmul``."""

    def __init__(self) -> None:
        super().__init__()
        self.my_param = nn.Parameter(torch.randn(5, 7) * 0.3)
        self.offset = nn.Parameter(torch.zeros(7))

    def forward(self, x):
        return torch.matmul(x, self.my_param) + self.offset


class CustomParamNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(ParamHolder(), nn.Tanh())
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.block(x))


class MNISTNet(nn.Module):
    """The tutorial's MNIST MLP 784-1000-2000-10 (2,807,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, 1000)
        self.linear2 = nn.Linear(1000, 2000)
        self.linear3 = nn.Linear(2000, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        return self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))


# --------------------------------------------------------------------------- the zoo


@dataclass
class Case:
    """One tiny model of the matrix.

    Attributes:
        name: Test id.
        build: Builds a fresh model (call under a fixed seed for identical weights).
        make_inputs: Builds a deterministic input tuple.
        targets: ``targets=`` for add_lora (None: every supported layer).
        rank: A rank that fits every targeted tensor.
        paths: The tensor paths that must carry an adapter.
    """

    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    targets: Any
    rank: int
    paths: list[str] = field(default_factory=list)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def inputs(self, seed: int = 123) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return self.make_inputs(g)


def _randn(*shape):
    return lambda g: (torch.randn(*shape, generator=g),)


def _emb_inputs(g):
    idx = torch.randint(0, 10, (3, 5), generator=g)
    idx[:, 0] = 0  # the padding index is always present
    return (idx,)


def _kdim_inputs(g):
    return (
        torch.randn(2, 3, 8, generator=g),
        torch.randn(2, 4, 6, generator=g),
        torch.randn(2, 4, 5, generator=g),
    )


CASES: list[Case] = [
    Case("mlp", MLP, _randn(3, 6), None, 3, ["fc1.weight", "fc2.weight"]),
    Case("conv1d", ConvNet1d, _randn(2, 3, 9), None, 2, ["conv.weight", "conv2.weight"]),
    Case(
        "conv2d",
        ConvNet2d,
        _randn(2, 4, 5, 5),
        None,
        2,
        ["conv.weight", "grouped.weight", "depthwise.weight", "head.weight"],
    ),
    Case("conv3d", ConvNet3d, _randn(1, 2, 4, 4, 4), None, 2, ["conv.weight", "conv2.weight"]),
    Case("embedding", EmbeddingNet, _emb_inputs, None, 2, ["emb.weight", "head.weight"]),
    Case("mha", MHANet, _randn(2, 4, 8), None, 2, ["attn.in_proj_weight", "attn.out_proj.weight"]),
    Case(
        "mha_kdim",
        MHAKdimNet,
        _kdim_inputs,
        None,
        2,
        [
            "attn.q_proj_weight",
            "attn.k_proj_weight",
            "attn.v_proj_weight",
            "attn.out_proj.weight",
        ],
    ),
    Case(
        "transformer",
        TransformerNet,
        _randn(2, 4, 8),
        None,
        2,
        [
            f"encoder.layers.{i}.{t}"
            for i in range(2)
            for t in (
                "self_attn.in_proj_weight",
                "self_attn.out_proj.weight",
                "linear1.weight",
                "linear2.weight",
            )
        ],
    ),
    Case("hf_conv1d", HFConv1DNet, _randn(2, 3, 6), None, 2, ["c_attn.weight", "c_proj.weight"]),
    Case(
        "custom_param",
        CustomParamNet,
        _randn(4, 5),
        ["block.0.my_param", "head"],
        2,
        ["block.0.my_param", "head.weight"],
    ),
]
CASE_BY_NAME = {c.name: c for c in CASES}
MODES = ["factored", "materialized"]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    """Every tiny model of the matrix."""
    return request.param


@pytest.fixture(params=MODES)
def mode(request) -> str:
    """Both forward modes."""
    return request.param


@pytest.fixture
def zoo() -> dict[str, Case]:
    """The cases by name, for tests that need one specific model."""
    return CASE_BY_NAME


# --------------------------------------------------------------------------- helpers


class Helpers:
    """Small helpers shared by the test modules (reach them through the ``h`` fixture)."""

    MLP = MLP
    MNISTNet = MNISTNet
    Conv1D = Conv1D
    ParamHolder = ParamHolder
    CustomParamNet = CustomParamNet
    TransformerNet = TransformerNet

    @staticmethod
    def loras(model: nn.Module):
        from lora_param import iter_lora

        return [p for *_, p in iter_lora(model)]

    @staticmethod
    def randomize(model: nn.Module, seed: int = 7, std_a: float = 0.5, std_b: float = 0.5):
        """Give every adapter a random A and a non-zero B, so that LoRA changes the outputs."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in Helpers.loras(model):
                p.lora_A.copy_(torch.randn(p.lora_A.shape, generator=g) * std_a)
                p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * std_b)

    @staticmethod
    def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
        """Copy A and B from one model's adapters into another's (same adapters, same order)."""
        from lora_param import iter_lora

        src_ps = {(path, p.adapter): p for path, _, _, p in iter_lora(src)}
        dst_ps = {(path, p.adapter): p for path, _, _, p in iter_lora(dst)}
        assert src_ps.keys() == dst_ps.keys()
        with torch.no_grad():
            for key, p in src_ps.items():
                dst_ps[key].lora_A.copy_(p.lora_A)
                dst_ps[key].lora_B.copy_(p.lora_B)

    @staticmethod
    def snapshot(model: nn.Module) -> dict:
        """Everything an operation that fails must leave untouched."""
        from lora_param import iter_lora

        return {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            # Sorted: parameter *order* is checked separately (remove_lora reorders, see
            # test_core_matrix.py::test_remove_lora_keeps_parameter_order).
            "params": sorted((n, id(p), p.requires_grad) for n, p in model.named_parameters()),
            "order": [n for n, _ in model.named_parameters()],
            "classes": [
                (n, type(m).__name__, parametrize.type_before_parametrizations(m))
                for n, m in model.named_modules()
            ],
            "plain_classes": [
                (n, type(m)) for n, m in model.named_modules() if not parametrize.is_parametrized(m)
            ],
            "adapters": [(path, p.adapter, p.enabled) for path, _, _, p in iter_lora(model)],
            "training": [(n, m.training) for n, m in model.named_modules()],
        }

    @staticmethod
    def assert_unchanged(model: nn.Module, snap: dict, *, order: bool = False) -> None:
        now = Helpers.snapshot(model)
        if order:
            assert now["order"] == snap["order"], "parameter order changed"
        assert now["state"].keys() == snap["state"].keys()
        for k, v in snap["state"].items():
            assert now["state"][k].dtype == v.dtype, k
            assert torch.equal(now["state"][k], v), f"{k} changed"
        assert now["params"] == snap["params"]
        assert now["classes"] == snap["classes"]
        assert now["plain_classes"] == snap["plain_classes"]
        assert now["adapters"] == snap["adapters"]
        assert now["training"] == snap["training"]

    @staticmethod
    def run(model: nn.Module, inputs: tuple, *, grad: bool = True) -> torch.Tensor:
        if grad:
            return model(*inputs)
        with torch.no_grad():
            return model(*inputs)

    @staticmethod
    def frozen_copy(model: nn.Module) -> nn.Module:
        """A deep copy with every parameter frozen: the reference 'base model'.

        Frozen, because ``nn.TransformerEncoderLayer`` picks its fused fast path in eval
        when no tensor requires grad, and LoRA freezes the base: an unfrozen reference would
        take the slow path and differ by float rounding.
        """
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        return ref

    @staticmethod
    def loss(out: torch.Tensor) -> torch.Tensor:
        return (out.float() ** 2).mean() + out.float().sum() * 0.1


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
