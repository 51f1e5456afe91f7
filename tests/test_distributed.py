"""LoRA training on PyTorch's own distributed engine: 2 CPU processes, gloo, loopback only.

One spawn (bounded in time) runs tests/ddp_worker.py on both ranks: a DistributedDataParallel
phase, then an FSDP2 (``fully_shard``) phase. The tests below check what the ranks recorded and
load what rank 0 saved into a single-process model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_param import iter_lora, list_adapters, load_lora, lora_disabled, set_active_adapters

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ddp_worker.py, next to this file
import ddp_worker  # noqa: E402

WORLD = 2
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    init_file = out / "rendezvous"
    ctx = mp.start_processes(
        ddp_worker.run,
        args=(WORLD, str(init_file), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        pytest.fail(f"a distributed worker failed:\n{errors}")
    finally:
        for proc in ctx.processes:  # only the processes this fixture started
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(WORLD)]
    return out, results


def _fresh_outputs(out, adapter_file, outputs_file):
    model = ddp_worker.make_base()
    load_lora(model, out / adapter_file)
    model.eval()
    saved = torch.load(out / outputs_file, weights_only=True)
    with torch.no_grad():
        return model, model(saved["x"]), saved


def test_ddp_ranks_hold_identical_adapters_after_every_step(dist_run):
    _, results = dist_run
    for r in results:
        ddp = r["ddp"]
        assert all(ddp["identical_every_step"]), ddp["identical_every_step"]
        assert len(ddp["identical_every_step"]) == ddp_worker.STEPS + 1
        assert ddp["trained"]


def test_ddp_equals_single_process_training(dist_run):
    _, results = dist_run
    for r in results:
        assert r["ddp"]["max_diff_vs_single_process"] < 1e-5


def test_ddp_base_and_inactive_adapter_untouched(dist_run):
    """Frozen base, and a disabled adapter raises no 'unused parameters' error and stays as it was."""
    _, results = dist_run
    for r in results:
        assert r["ddp"]["base_unchanged"]
        assert r["ddp"]["spare_unchanged"]
        assert r["ddp"]["lora_off_equals_base"]


def test_ddp_rank0_adapter_loads_into_single_process_model(dist_run):
    out, _ = dist_run
    model, _, saved = _fresh_outputs(out, "ddp_adapter.pt", "ddp_outputs.pt")
    assert set(list_adapters(model)) == {"default", "spare"}
    # A file records no on/off state: load enables both; the workers ran with "spare" off.
    assert all(p.enabled for *_, p in iter_lora(model))
    set_active_adapters(model, "default")
    with torch.no_grad():
        assert torch.equal(model(saved["x"]), saved["on"])
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(model(saved["x"]), ddp_worker.make_base()(saved["x"]))


def test_ddp_rank0_peft_export_loads(dist_run):
    pytest.importorskip("safetensors")
    from lora_param.interop.peft import import_peft

    out, _ = dist_run
    model = import_peft(ddp_worker.make_base(), out / "ddp_peft").eval()
    saved = torch.load(out / "ddp_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["on"], rtol=1e-6, atol=1e-6)


def test_ddp_switching_adapters_after_wrapping_with_find_unused_parameters(dist_run):
    _, results = dist_run
    for r in results:
        assert r["toggle"] == {"completed": True, "b_frozen_after_switch": True, "identical": True}


def _fsdp2(results):
    r = results[0]["fsdp2"]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    return [res["fsdp2"] for res in results]


def test_fsdp2_fully_shard_trains_like_single_process(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        assert (
            r["sharded_type"] == "DTensor"
        )  # the base weight under the parametrization is sharded
        assert r["n_trainable"] == 6  # lora_A/B of the 3 enabled layers; base and "spare" frozen
        assert r["max_diff_vs_single_process"] < 1e-5
        assert r["eval_grad_enabled_max_diff"] < 1e-5
        assert r["lora_off_equals_base"]


def test_fsdp2_no_grad_evaluation_sees_trained_adapter(dist_run):
    """The no_grad weight cache must not serve W + BA from before training (FSDP2 all-gathers
    into the same storage without bumping version counters)."""
    _, results = dist_run
    for r in _fsdp2(results):
        assert r["eval_no_grad_max_diff"] < 1e-5


def test_fsdp2_gathered_adapter_loads_into_single_process_model(dist_run):
    out, results = dist_run
    _fsdp2(results)
    _, outputs, saved = _fresh_outputs(out, "fsdp2_adapter.pt", "fsdp2_outputs.pt")
    torch.testing.assert_close(outputs, saved["on"], rtol=1e-5, atol=1e-6)


def _tensors(path):
    payload = torch.load(path, weights_only=True)
    return json.loads(payload["config"]), payload["tensors"]


def test_fsdp2_save_lora_on_every_rank_writes_the_single_process_file(dist_run):
    """save_lora on the sharded model gathers the shards itself; rank 0 writes one file equal to
    the one single-process training on the same data writes (to float rounding)."""
    out, results = dist_run
    _fsdp2(results)
    config, tensors = _tensors(out / "fsdp2_adapter.pt")
    ref_config, ref_tensors = _tensors(out / "fsdp2_reference.pt")
    assert config == ref_config
    assert tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        assert type(tensors[key]) is torch.Tensor and tensors[key].shape == value.shape
        torch.testing.assert_close(tensors[key], value, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_fsdp2_export_peft_on_every_rank_loads_into_a_plain_model(dist_run):
    pytest.importorskip("safetensors")
    from lora_param.interop.peft import import_peft

    out, results = dist_run
    _fsdp2(results)
    model = import_peft(ddp_worker.make_base(), out / "fsdp2_peft").eval()
    saved = torch.load(out / "fsdp2_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["on"], rtol=1e-5, atol=1e-6)


def test_fsdp2_load_lora_into_sharded_model_matches_plain(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        assert r["sharded_load_max_diff"] < 1e-5


def test_fsdp2_merge_remove_and_add_on_shards_are_refused_without_change(dist_run):
    _, results = dist_run
    for r in _fsdp2(results):
        merge, remove, add, inject = r["refusals"]
        assert "merge_lora cannot change a sharded (FSDP2) model" in merge
        assert "remove_lora cannot change a sharded (FSDP2) model" in remove
        assert "add_lora cannot adapt sharded (FSDP2) weights" in add
        assert "add them before fully_shard" in inject
        assert r["unchanged_after_refusal"] and r["bare_has_no_adapter"]


def test_fsdp2_save_called_on_one_rank_only_says_so(dist_run):
    _, results = dist_run
    _fsdp2(results)
    message = results[0]["one_rank"]["message"]
    assert "is a collective: every rank must call it" in message
    assert "save_lora" in message
