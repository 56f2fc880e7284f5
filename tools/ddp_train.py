"""Train a graphpeft LoRA model data-parallel on torch.distributed: DDP, or accelerate's Accelerator.

Launch with torchrun (CPU + gloo here; on GPUs the same script uses nccl, one GPU per rank):

    torchrun --nproc_per_node 2 --standalone tools/ddp_train.py --out OUT [--mode ddp|accelerate] [--steps 6]

Every rank builds the same tiny Llama (seeded), rewrites it with LoRA on all linear layers, but draws
its LoRA initialisation and its fixed synthetic batch from a seed of its own: the ranks only agree
after training if the wrapper broadcast the initial adapters and all-reduced the gradients.
Each rank writes ``OUT/rank<R>.safetensors`` (adapter tensors before and after training) and
``OUT/rank<R>.json`` (losses, world size, backend, mode); rank 0 also saves the adapter with
``save_pretrained`` to ``OUT/adapter``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import graphpeft  # noqa: E402
from graphpeft.runtime.io import adapter_state  # noqa: E402


def snapshot(model: graphpeft.GraphPeftModel, prefix: str) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors (adapter_state returns views of the live parameters)."""
    return {f"{prefix}.{k}": v.clone() for k, v in adapter_state(model, "default").items()}

BATCH, SEQ, VOCAB = 4, 12, 100


def full_snapshot(wrapped: torch.nn.Module, model: graphpeft.GraphPeftModel, prefix: str, mode: str) -> dict:
    """The snapshot of the whole adapter; under FSDP the parameters are gathered from their shards first."""
    if mode != "fsdp":
        return snapshot(model, prefix)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False):
        return snapshot(model, prefix)


def tiny_llama() -> torch.nn.Module:
    """The same tiny LlamaForCausalLM on every rank (hidden 32, 2 layers; tests/models.py's shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def rank_batch(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed synthetic batch, different on every rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def build(rank: int, device: torch.device = torch.device("cpu")) -> graphpeft.GraphPeftModel:
    """Rewrite on the rank's device: the captured graph names the device it was captured on (arange,
    masks), so a graph captured on the CPU cannot simply be moved to a GPU afterwards."""
    base = tiny_llama().to(device)
    inputs = {k: v.to(device) for k, v in graphpeft.synthesize_inputs(base).items()}
    torch.manual_seed(100 + rank)        # a different LoRA initialisation on each rank
    config = graphpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    model = graphpeft.rewrite(base, config, example_inputs=inputs)
    return model.train()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the per-rank results")
    parser.add_argument("--mode", choices=("ddp", "accelerate", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on GPU, else gloo)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if args.mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        backend = dist.get_backend() if dist.is_initialized() else "none"
    else:
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)

    model = build(rank, device)
    before = snapshot(model, "before")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if args.mode == "accelerate":
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # the base weights are frozen and the adapters train: FSDP needs use_orig_params=True for that mix
        on_gpu = device.type == "cuda"
        if not on_gpu:       # FSDP's sync_module_states needs GPU tensors: broadcast rank 0's parameters by hand
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        wrapped = FSDP(model, use_orig_params=True, sync_module_states=on_gpu,
                       device_id=device if on_gpu else torch.device("cpu"))
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    # the wrapper broadcast rank 0's parameters: read the starting adapters after wrapping
    start = full_snapshot(wrapped, model, "start", args.mode)

    batch = rank_batch(rank, device)
    losses = []
    for _ in range(args.steps):
        loss = wrapped(**batch).loss
        if args.mode == "accelerate":
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    after = full_snapshot(wrapped, model, "after", args.mode)
    save_file({**before, **start, **after}, str(out / f"rank{rank}.safetensors"))
    summary = {"rank": rank, "world_size": world, "backend": backend, "mode": args.mode, "losses": losses,
               "trainable": sum(p.numel() for p in trainable)}
    (out / f"rank{rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=False):
            if rank == 0:
                model.save_pretrained(str(out / "adapter"))
    elif rank == 0:
        model.save_pretrained(str(out / "adapter"))
    if args.mode == "accelerate":
        accelerator.wait_for_everyone()
        accelerator.end_training()
    else:
        dist.barrier()
        dist.destroy_process_group()
    print(f"rank {rank}/{world} ({args.mode}, {backend}): loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
