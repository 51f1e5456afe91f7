"""Made the files in this folder with lora_param 0.2.2 (run from a 0.2.2 checkout):

    PYTHONPATH=<0.2.2 checkout> python tests/data/v02/make_files.py tests/data/v02

They pin what 0.3 must still read: a 0.2 adapter file (format 1: LoRA with rsLoRA, a trained
head, DoRA with trained biases, per-expert LoRA) and a 0.2 state dict of a model with an NF4
base (its double-quantization offset stored 0-d), each with the base weights, inputs and the
outputs 0.2.2 computed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 6, 8) * 0.3)  # (experts, out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(torch.nn.functional.linear(x, self.up[e]) for e in range(3))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.experts = Experts()
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(self.emb(ids)))))
        return self.head(self.experts(h))


def main(out: Path) -> None:
    import lora_param as lp

    torch.manual_seed(0)
    base = Net()
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    model = Net()
    model.load_state_dict(base.state_dict())
    lp.add_lora(model, ["emb", "fc1"], rank=2, alpha=3, use_rslora=True, trainable="head", adapter="a")
    lp.add_lora(model, ["fc1", "fc2"], rank=2, use_dora=True, bias="lora_only", adapter="d")
    lp.add_lora(model, ["experts.up"], rank=2, adapter="e")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lp.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        outputs = {}
        for name in ("a", "d", "e"):
            lp.set_active_adapters(model, [name])
            outputs[name] = model(ids)
    lp.save_lora(model, out / "adapters.pt")
    torch.save({"base": base.state_dict(), "ids": ids, "outputs": outputs}, out / "adapters_ref.pt")

    torch.manual_seed(0)
    packed = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4))
    lp.add_lora(packed, rank=2, quantize="nf4")
    with torch.no_grad():
        for p in lp.adapter_parameters(packed):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        x = torch.randn(3, 64, generator=g)
        y = packed(x)
    torch.save({"state": packed.state_dict(), "x": x, "y": y}, out / "nf4_state.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
