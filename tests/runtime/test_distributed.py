"""Data-parallel training of a rewritten model: DDP and FSDP under torchrun, and accelerate, on CPU with gloo.

``tools/ddp_train.py`` runs on two ranks; each rank starts from a LoRA initialisation and a batch of its
own, so the ranks agree only if the wrapper broadcast rank 0's adapters and averaged the gradients. The
tests check that the adapters are bitwise identical on both ranks after training, that they moved, that
the loss fell on each rank, and that the result is what one process gets on the two batches together.
FSDP (FullyShardedDataParallel, use_orig_params=True) shards the frozen base and the adapters alike;
its adapters are read with summon_full_params.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow       # two processes per launch; make test-all runs them

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "ddp_train.py"
BIN = Path(sys.executable).parent
STEPS = 6


def _launch(mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    script_args = [str(SCRIPT), "--out", str(out), "--steps", str(STEPS)]
    if mode in ("ddp", "fsdp"):
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", *script_args, "--mode", mode]
    else:
        # accelerate's multi-process launcher (torchrun underneath); with no GPU the Accelerator uses gloo
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               *script_args, "--mode", "accelerate"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _ranks(out: Path) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(json.loads((out / f"rank{r}.json").read_text()), load_file(out / f"rank{r}.safetensors")) for r in (0, 1)]


def _phase(tensors: dict[str, torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
    return {k[len(phase) + 1:]: v for k, v in tensors.items() if k.startswith(phase + ".")}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_process(script) -> dict[str, torch.Tensor]:
    """Rank 0's start, trained in one process on both ranks' batches at once (what DDP should compute)."""
    torch.manual_seed(0)
    model = script.build(0)
    batches = [script.rank_batch(r, torch.device("cpu")) for r in (0, 1)]
    batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k[len("after."):]: v for k, v in script.snapshot(model, "after").items()}


@pytest.fixture(scope="module", params=["ddp", "accelerate", "fsdp"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    mode = request.param
    if mode == "accelerate" and importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed (pip install 'graphpeft[dev]')")
    out = tmp_path_factory.mktemp(f"dist-{mode}")
    _launch(mode, out)
    return mode, out


def test_two_ranks_ran_on_gloo(trained):
    mode, out = trained
    for rank, (summary, _) in enumerate(_ranks(out)):
        assert (summary["rank"], summary["world_size"], summary["backend"], summary["mode"]) == (rank, 2, "gloo", mode)
        assert len(summary["losses"]) == STEPS


def test_adapters_identical_on_both_ranks_and_moved(trained):
    (_, t0), (_, t1) = _ranks(trained[1])
    before0, before1 = _phase(t0, "before"), _phase(t1, "before")
    assert before0.keys() == before1.keys() and len(before0) == 28   # 7 linear layers x 2 blocks x (A, B)
    # each rank started from its own initialisation: agreement below is the wrapper's doing
    assert any(not torch.equal(before0[k], before1[k]) for k in before0)
    for phase in ("start", "after"):
        a, b = _phase(t0, phase), _phase(t1, phase)
        assert a.keys() == before0.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{phase}: ranks differ on {different[:3]}"
    start, after = _phase(t0, "start"), _phase(t0, "after")
    assert torch.equal(start["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       before0["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])  # rank 0's won
    assert all(not torch.equal(start[k], after[k]) for k in start), "some adapter tensor did not train"


def test_loss_falls_on_every_rank(trained):
    for summary, _ in _ranks(trained[1]):
        losses = summary["losses"]
        assert losses[-1] < losses[0] - 0.05, losses
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_gradients_were_averaged(trained, single_process):
    """Two ranks on a batch each == one process on both batches (equal token counts: mean of means)."""
    after = _phase(_ranks(trained[1])[0][1], "after")
    assert after.keys() == single_process.keys()
    for key, value in single_process.items():
        torch.testing.assert_close(after[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_rank0_saved_the_trained_adapter(trained):
    from graphpeft.runtime.io import read_adapter

    config, tensors = read_adapter(trained[1] / "adapter")
    assert config["peft_type"] == "LORA"
    after = _phase(_ranks(trained[1])[0][1], "after")
    assert tensors.keys() == after.keys()
    assert all(torch.equal(tensors[k], after[k]) for k in after)


def test_trainer_on_two_processes_equals_one_process(tmp_path):
    """transformers' Trainer under accelerate launch (2 processes, gloo): gradients are synchronized, so the
    saved adapter equals one process trained on the same global batches."""
    script = ROOT / "tools" / "trainer_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    two = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), "--out", str(tmp_path / "two"), "--batch", "2"]
    one = [sys.executable, str(script), "--out", str(tmp_path / "one"), "--batch", "4"]
    for cmd in (two, one):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")}
    assert (runs["two"]["world_size"], runs["two"]["backend"], runs["one"]["world_size"]) == (2, "gloo", 1)
    assert runs["two"]["losses"] == pytest.approx(runs["one"]["losses"], abs=1e-5)
    one, two = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and len(one) == 28
    assert all(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)        # B starts at zero: it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)
    assert sorted(p.name for p in (tmp_path / "two" / "adapter").iterdir() if p.suffix == ".safetensors") == \
        ["adapter_model.safetensors"]                     # the adapter only, never the model's weights
