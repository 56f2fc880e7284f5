"""Train a graphpeft LoRA model with transformers' Trainer: in one process, or data-parallel under accelerate.

    python tools/trainer_train.py --out OUT --batch 4                                          # one process
    accelerate launch --multi_gpu --num_processes 2 tools/trainer_train.py --out OUT --batch 2   # two (gloo on CPU)

Every process builds the same tiny Llama and rewrites it with LoRA on all linear layers (rank 0's
initialisation of tools/ddp_train.py wins: the Trainer's DDP wrapper broadcasts it). The data is 16
seeded rows; Trainer's sampler hands each process its share of every global batch, so two processes
with ``--batch 2`` see what one process with ``--batch 4`` sees. The main process saves the adapter
with ``Trainer.save_model`` to ``OUT/adapter`` and writes ``OUT/summary.json`` (world size, losses).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from ddp_train import SEQ, VOCAB, build  # noqa: E402  (tools/ is the script's folder)

ROWS = 16


def rows() -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=gen)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * SEQ, "labels": r.tolist()} for r in ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=4, help="per-process batch size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    training = TrainingArguments(str(out / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                                 gradient_accumulation_steps=args.grad_accum, learning_rate=1e-2, report_to=[],
                                 use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", seed=0,
                                 disable_tqdm=True)
    model = build(0)
    trainer = Trainer(model=model, args=training, train_dataset=rows())
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        summary = {"world_size": training.world_size, "backend": backend, "losses": losses}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{training.world_size} process(es): loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
