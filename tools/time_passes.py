"""How long capture and the LoRA pass take, and whether the pass stays linear in depth.

    .venv/bin/python tools/time_passes.py [--layers 8 32] [--hidden 64]

Prints, per depth: graph nodes, capture time, pass time for LoRA on the default sites (query/value)
and on "all-linear", and the pass time as a share of capture. A developer script, not a benchmark of
record (that is issue 6's tools/bench.py).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import graphpeft
from graphpeft.passes import LoraConfig, LoraPass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    print(f"{'layers':>6} {'nodes':>6} {'capture s':>10} {'pass q,v s':>11} {'pass all s':>11} {'pass/capture':>13}")
    for layers in args.layers:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
        start = time.perf_counter()
        gm = graphpeft.capture(model)
        capture_s = time.perf_counter() - start
        times = []
        for config in (LoraConfig(), LoraConfig(target_modules="all-linear")):
            graph = copy.deepcopy(gm)
            start = time.perf_counter()
            LoraPass(config)(graph)
            times.append(time.perf_counter() - start)
        print(f"{layers:>6} {len(gm.graph.nodes):>6} {capture_s:>10.2f} {times[0]:>11.3f} {times[1]:>11.3f} "
              f"{max(times) / capture_s:>12.1%}")


if __name__ == "__main__":
    main()
