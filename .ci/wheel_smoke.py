"""Smoke test of the installed wheel in a bare environment: torch and the declared dependencies.

Run by .ci/run (and the release workflow) as ``<bare venv>/bin/python -I .ci/wheel_smoke.py``
after ``pip install lora_param-*.whl`` without extras. Checks that the installed package (not
a checkout) imports without any optional dependency, adapts, trains, saves, loads and merges a
tiny model, ships ``py.typed`` and its version, and that every optional feature says which
extra to install when its dependency is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import struct
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

OPTIONAL = ("transformers", "peft", "safetensors", "bitsandbytes", "torchvision", "matplotlib")


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"wheel smoke test FAILED: {what}")
    print(f"ok  {what}")


def expect_hint(fn, extra: str, what: str) -> None:
    """``fn()`` must raise, naming ``pip install ... lora_param[<extra>]``."""
    try:
        fn()
    except Exception as e:  # LoRAError or ImportError, both say what to install
        text = str(e)
        check(
            "pip install" in text and f"lora_param[{extra}]" in text,
            f"{what}: {type(e).__name__} says `pip install lora_param[{extra}]` ({text[:90]}...)",
        )
        return
    check(False, f"{what}: no error without its optional dependency")


def safetensors_file(path: Path) -> None:
    """A minimal valid safetensors file, written by hand (the library is not installed)."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0))


def main() -> int:
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    check(not missing, f"bare environment: no optional dependency installed (found: {missing})")

    import torch
    from torch import nn

    import lora_param as lp

    where = Path(lp.__file__).resolve()
    check("site-packages" in where.parts, f"lora_param imported from the wheel ({where.parent})")
    version = importlib.metadata.version("lora_param")
    check(lp.__version__ == version, f"lora_param.__version__ {lp.__version__} == metadata")
    check((where.parent / "py.typed").is_file(), "py.typed is installed")
    loaded = [m for m in OPTIONAL if m in sys.modules]
    check(not loaded, f"import lora_param imports no optional dependency ({loaded})")

    # adapt, train one step, toggle, save/load, merge: a tiny model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with torch.no_grad():
        base_out = model(x)
    lp.add_lora(model, ["0", "2"], rank=2)
    params = lp.adapter_parameters(model)
    opt = torch.optim.SGD(params, lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        on = model(x)
        with lp.lora_disabled(model):
            off = model(x)
    check(torch.equal(off, base_out), "LoRA off reproduces the base model exactly")
    check(not torch.allclose(on, base_out), "a training step changed the LoRA-on output")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.pt"
        lp.save_lora(model, path)
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        lp.load_lora(fresh, path)
        with torch.no_grad():
            check(torch.allclose(fresh(x), on, atol=1e-6), "save_lora / load_lora round trip")
        merged = lp.merge_lora(model)
        with torch.no_grad():
            check(torch.allclose(merged(x), on, atol=1e-5), "merge_lora keeps the outputs")
        check(not list(lp.iter_lora(merged)), "merge_lora leaves plain layers")

        # every optional feature names its extra
        adapted = lp.add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
        expect_hint(lambda: lp.export_peft(adapted, Path(tmp) / "out"), "peft", "export_peft")
        peft_dir = Path(tmp) / "peft_in"
        peft_dir.mkdir()
        (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        safetensors_file(peft_dir / "adapter_model.safetensors")
        expect_hint(
            lambda: lp.import_peft(nn.Sequential(nn.Linear(4, 4)), peft_dir), "peft", "import_peft"
        )
        kohya = Path(tmp) / "lora.safetensors"
        safetensors_file(kohya)
        expect_hint(
            lambda: lp.import_kohya(nn.Sequential(nn.Linear(4, 4)), kohya), "peft", "import_kohya"
        )
        expect_hint(
            lambda: lp.export_kohya(adapted, Path(tmp) / "k.safetensors"), "peft", "export_kohya"
        )
        expect_hint(
            lambda: lp.quantize_base(nn.Sequential(nn.Linear(64, 64)), kernel="bitsandbytes"),
            "quant",
            "quantize_base(kernel='bitsandbytes')",
        )

        def trainer() -> object:
            from lora_param.interop.transformers import LoRATrainer

            return LoRATrainer

        expect_hint(trainer, "hf", "LoRATrainer")
        expect_hint(lambda: lp.LoRATrainer, "hf", "from lora_param import LoRATrainer")

        # plots: the figures are skipped with a message; the MNIST command needs torchvision
        from lora_param.mnist.report import plot_errors

        check(plot_errors([1] * 10, [0] * 10) is None, "plot_errors without matplotlib: None")
        from lora_param.mnist import MNISTTensors, PipelineConfig, PretrainConfig, run_pipeline

        def tiny(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.rand(n, 784), torch.arange(n) % 10

        out = io.StringIO()
        with redirect_stdout(out):
            run_pipeline(
                PipelineConfig(pretrain=PretrainConfig(steps=5), validation_size=20,
                               finetune_steps=2, progress=False, out=str(Path(tmp) / "run")),
                data=MNISTTensors(*tiny(100), *tiny(30)),
            )  # fmt: skip
        check(
            "matplotlib is not installed" in out.getvalue()
            and "lora_param[plot]" in out.getvalue(),
            "the MNIST pipeline without matplotlib: skips the plots, says `lora_param[plot]`",
        )
        cli = Path(sys.executable).with_name("lora-param-mnist")
        check(cli.is_file(), "the lora-param-mnist command is installed")
        proc = subprocess.run(
            [str(cli), "--data-dir", tmp, "--no-progress"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        check(
            proc.returncode == 2
            and 'pip install "lora_param[mnist]"' in proc.stderr
            and "Traceback" not in proc.stderr,
            f"lora-param-mnist without torchvision: exit 2 and the extra to install "
            f"({proc.stderr.strip().splitlines()[-1][-110:]})",
        )
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
