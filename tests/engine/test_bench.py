"""tools/bench.py's arithmetic: the memory measure sees a step's allocations, and the target table divides
the right figures (the benchmark itself is too slow for the suite; ``--quick`` runs it in under a minute)."""

from __future__ import annotations

import pytest
import torch

from tests.tool_scripts import tool_module


@pytest.fixture(scope="module")
def bench():
    with tool_module("bench.py") as module:
        yield module


def test_step_peak_counts_what_a_step_allocates_at_once(bench):
    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256)

    class Workload:
        batch = {"input": x}

        @staticmethod
        def loss(out):
            big = torch.ones(1024, 1024)              # 4 MiB, alive only inside the step
            return out.sum() + big.sum() * 0

    cfg = bench.Config("toy", lin, lin, torch.optim.AdamW(lin.parameters()))
    peak = bench.step_peak_bytes(cfg, Workload)
    assert 4 * 2 ** 20 <= peak < 6 * 2 ** 20
    # after the step: the weight, AdamW's two moments and its step counter (a 0-dim float); no gradient
    assert bench.held_bytes(cfg) == 3 * 256 * 256 * 4 + 4


def test_targets_divide_the_matching_figures(bench):
    eager = {"floor": 1.0, "full fine-tuning": 2.0, "peft lora q,v": 1.1, "graphpeft lora q,v": 1.01,
             "peft lora all-linear": 1.3, "graphpeft lora all-linear": 1.2}
    results = {"workloads": {"llama-512x4": {
        "eager_step_s": eager,
        "compiled_step_s": {k: v / 2 for k, v in eager.items()} | {"graphpeft lora q,v": 0.5},
        "compile_s": {"peft lora q,v": 30.0, "graphpeft lora q,v": 10.0, "peft lora all-linear": 40.0,
                      "graphpeft lora all-linear": 50.0},
        "peak_mib": {"peft lora q,v": 100.0, "graphpeft lora q,v": 99.0, "peft lora all-linear": 100.0,
                     "graphpeft lora all-linear": 101.0},
        "setup": {"q,v": {"passes_share_of_capture": 0.05}},
        "ort": {"step_s": 0.7},
    }}, "meta_7b": {"layers": 32, "total_s": 16.0, "peak_rss_mib": 500.0, "rewrite_growth_vs_depth_growth": 1.0}}
    rows = {name: (value, met) for name, value, limit, met in bench.targets(results)}
    assert rows["eager LoRA(all-linear) / eager floor"] == (pytest.approx(1.2), False)
    assert rows["eager LoRA(all-linear) / PEFT eager"] == (pytest.approx(1.2 / 1.3), False)
    assert rows["eager LoRA(q,v) / eager floor"] == (pytest.approx(1.01), True)
    assert rows["compiled LoRA(q,v) / compiled PEFT"] == (pytest.approx(0.5 / 0.55), True)
    assert rows["compile time LoRA(q,v) / PEFT's"] == (pytest.approx(1 / 3), True)
    assert rows["compile time LoRA(all-linear) / PEFT's"][1] is False
    assert rows["peak memory LoRA(q,v) / PEFT's"] == (pytest.approx(0.99), True)
    assert rows["peak memory LoRA(all-linear) / PEFT's"][1] is False
    assert rows["ONNX Runtime step / PyTorch eager step"] == (pytest.approx(0.7 / 1.01), True)
    assert rows["7B-shape capture + rewrite on meta, s (32 layers)"] == (16.0, False)
    assert rows["passes / capture time (q,v)"] == (0.05, True)
