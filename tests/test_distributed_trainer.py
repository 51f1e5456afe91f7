"""LoRATrainer (and TRL's SFTTrainer with LoRATrainerMixin) under accelerate's FSDP2 and under
DeepSpeed ZeRO-3: 2 CPU processes, gloo, one torchrun launch for both (tests/trainer_worker.py).

What is checked: checkpoints hold the adapters (ours and PEFT's files) and no copy of the base;
resuming from the step-2 checkpoint gives the loss curve of the uninterrupted run; the final
save holds every adapter tensor whole, equal to what the ranks trained; a gathered state dict
handed to ``_save`` is what gets written; the set-ups that cannot work are refused with a
``LoRAError`` that says what to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_param import import_peft, load_lora

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # trainer_worker.py, next to this file
import trainer_worker  # noqa: E402

TIMEOUT_S = 360
ADAPTER_FILE = "lora_adapters.pt"
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _launch(out: Path) -> None:
    """torchrun (a free port, 2 processes) on the worker, both engines in one launch (the
    imports of transformers, accelerate, TRL and DeepSpeed are paid once); its whole process
    group is killed on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(HERE / "trainer_worker.py"), "all", str(out)]
    log = out / "workers.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the 2 workers it started
            proc.wait()
            pytest.fail(f"the workers did not finish within {TIMEOUT_S}s")
    if code != 0:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        pytest.fail(f"the workers failed ({code}):\n{errors or log.read_text()[-4000:]}")


def _engine(out: Path, engine: str) -> tuple[Path, dict, dict]:
    folder = out / engine
    record = json.loads((folder / f"{engine}.json").read_text())
    tensors = torch.load(folder / f"{engine}_tensors.pt", weights_only=True)
    return folder, record, tensors


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    _launch(out)
    return out


@pytest.fixture(scope="module")
def fsdp2(launched):
    return _engine(launched, "fsdp2")


@pytest.fixture(scope="module")
def zero3(launched):
    pytest.importorskip("deepspeed")
    return _engine(launched, "zero3")


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / ADAPTER_FILE, weights_only=True)["tensors"]


def _check_complete(folder: Path, trained: dict[str, torch.Tensor]) -> None:
    """The folder's adapter file holds every trained tensor whole; both formats load and give
    the outputs of the trained adapters."""
    written = _file_tensors(folder)
    assert written.keys() == trained.keys()
    for key, value in trained.items():
        assert written[key].shape == value.shape and value.numel() > 0, key
        torch.testing.assert_close(written[key], value, rtol=0, atol=0, msg=key)
    ids = torch.randint(0, trainer_worker.VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    reference = load_lora(trainer_worker.make_base().eval(), folder / ADAPTER_FILE)
    via_peft = import_peft(trainer_worker.make_base().eval(), folder)
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(via_peft(ids).logits, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(want, trainer_worker.make_base().eval()(ids).logits)


def _check_adapters_only(files: list[str]) -> None:
    assert {ADAPTER_FILE, *PEFT_FILES} <= set(files), files
    whole_model = {"model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp.bin"}
    assert not any(f.startswith("pytorch_model_fsdp") or f in whole_model for f in files), files


FSDP2_RUNS = ["SHARDED_STATE_DICT", "FULL_STATE_DICT", "trl"]


def _run(record: dict, name: str) -> dict:
    if name == "trl":
        pytest.importorskip("trl")
    return record[name]


@pytest.mark.parametrize("name", FSDP2_RUNS)
def test_fsdp2_checkpoints_hold_the_adapters_only(fsdp2, name):
    _, record, _ = fsdp2
    run = _run(record, name)
    _check_adapters_only(run["checkpoint"])
    assert ("optimizer_0" in run["checkpoint"]) == (name != "FULL_STATE_DICT")
    _check_adapters_only(run["final"])
    if name != "trl":
        assert run["sharded"] == "DTensor"  # the adapters were sharded while training
        # the launch-like run: bf16 mixed precision, as in the docs' config file
        assert run["mixed_precision"] == ("bf16" if name == "SHARDED_STATE_DICT" else "no")


@pytest.mark.parametrize("name", FSDP2_RUNS)
def test_fsdp2_resume_continues_the_loss_curve(fsdp2, name):
    _, record, tensors = fsdp2
    run = _run(record, name)
    assert len(run["losses"]) == trainer_worker.STEPS
    assert run["resumed_losses"] == pytest.approx(run["losses"], rel=1e-6)
    for key, value in tensors[name].items():
        torch.testing.assert_close(tensors[f"{name}_resumed"][key], value, msg=key)


@pytest.mark.parametrize("name", FSDP2_RUNS)
def test_fsdp2_final_save_is_complete(fsdp2, name):
    out, record, tensors = fsdp2
    _run(record, name)
    _check_complete(out / name / "final", tensors[name])


def test_fsdp2_save_from_gathered_state_dict(fsdp2):
    """FULL_STATE_DICT: the state dict accelerate gathers, handed to _save as Trainer does."""
    out, record, tensors = fsdp2
    _check_adapters_only(record["from_state_dict"])
    _check_complete(out / "from_state_dict", tensors["FULL_STATE_DICT"])


def test_fsdp2_sharded_state_dict_is_refused_before_writing(fsdp2):
    _, record, _ = fsdp2
    assert "is a shard (DTensor), not the full tensor" in record["shards_refused"]
    assert "LoRATrainer.save_model()" in record["shards_refused"]
    assert record["shards_written"] is False


def test_fsdp2_setups_that_cannot_work_are_refused(fsdp2):
    _, record, _ = fsdp2
    refusals = record["refusals"]
    assert "needs FSDP2" in refusals["fsdp1"] and "fsdp_version: 2" in refusals["fsdp1"]
    assert "already sharded" in refusals["sharded_without_fsdp"]


def test_zero3_checkpoints_hold_the_adapters_only(zero3):
    out, record, _ = zero3
    run = record["zero3"]
    assert run["partitioned_numel"] == 0  # the adapters were partitioned while training
    _check_adapters_only(run["checkpoint"])
    _check_adapters_only(run["final"])
    states = sorted((out / "zero3" / "run" / "checkpoint-2").glob("global_step2/*model_states.pt"))
    assert len(states) == 2
    for path in states:  # DeepSpeed's own files: the adapters' partitions, no frozen base
        saved = torch.load(path, weights_only=False)
        assert saved["module"] and all(".lora_" in key for key in saved["module"])
        assert not saved.get("frozen_param_fragments")


def test_zero3_resume_continues_the_loss_curve(zero3):
    _, record, tensors = zero3
    run = record["zero3"]
    assert len(run["losses"]) == trainer_worker.STEPS
    assert run["resumed_losses"] == pytest.approx(run["losses"], rel=1e-6)
    for key, value in tensors["zero3"].items():
        torch.testing.assert_close(tensors["zero3_resumed"][key], value, msg=key)


def test_zero3_final_save_is_complete(zero3):
    out, _, tensors = zero3
    _check_complete(out / "zero3" / "final", tensors["zero3"])


def test_zero3_save_from_consolidated_state_dict(zero3):
    out, record, tensors = zero3
    _check_adapters_only(record["from_state_dict"])
    _check_complete(out / "from_state_dict", tensors["zero3"])


def test_zero3_checkpoint_loads_into_partitioned_model(zero3):
    """load_best_model_at_end's path: every rank loads, the partitions get the file's values."""
    _, record, tensors = zero3
    step2 = _file_tensors(Path(record["step2_file"]).parent)
    assert tensors["zero3_loaded_step2"].keys() == step2.keys()
    for key, value in step2.items():
        torch.testing.assert_close(tensors["zero3_loaded_step2"][key], value, msg=key)


def test_save_merged_of_a_sharded_llama_loads_with_from_pretrained(fsdp2):
    """save_merged on every rank of a Llama sharded with fully_shard: save_pretrained's layout
    (tied lm_head written once), and from_pretrained gives the LoRA-on outputs."""
    pytest.importorskip("safetensors")
    import transformers

    out, record, _ = fsdp2
    assert record["merged"] == ["config.json", "generation_config.json", "model.safetensors"]
    merged = transformers.LlamaForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(0, trainer_worker.VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = trainer_worker.trained_model().eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(want, trainer_worker.make_base().eval()(ids).logits)


def test_save_pretrained_on_a_sharded_model_points_to_save_merged(fsdp2):
    _, record, _ = fsdp2
    assert "save_merged(model, folder) on every rank" in record["save_pretrained_sharded"]
    assert record["pretrained_written"] is False


def test_save_merged_under_zero3_is_refused_with_the_fix(zero3):
    _, record, _ = zero3
    assert "DeepSpeed ZeRO-3 partitions" in record["save_merged_refused"]
    assert "load_lora" in record["save_merged_refused"]
    assert record["merged_written"] is False
