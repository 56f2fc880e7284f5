"""graphpeft against PEFT, side by side: one command, one process, the same model, batch and thread count.

    .venv/bin/python tools/bench.py                 # Llama-shaped (hidden 512, 4 layers) + all-MiniLM-L6-v2,
                                                    # eager and compiled, + the 7B shape on meta
    .venv/bin/python tools/bench.py --quick         # a small Llama, eager only: under a minute
    .venv/bin/python tools/bench.py --models llama --no-compile --reps 20 --json bench.json

What it measures (median of --reps repetitions; configurations are timed round-robin, so a noisy
neighbour slows all of them alike):

(a) setup: graphpeft.rewrite (capture + passes) against peft.get_peft_model, and the passes' share of
    capture time; a Llama-7B-shaped model on the meta device (capture + rewrite time, peak RSS, and the
    pass time at several depths, to show it is linear in the number of layers);
(b) one training step (forward, backward, AdamW) of: the frozen-base floor (forward + backward to the
    activations, no weight gradient: inputs_embeds that require grad), full fine-tuning, PEFT LoRA and
    graphpeft LoRA on q,v and on all-linear with the same config, PEFT DoRA and graphpeft DoRA (use_dora) on
    all-linear, and graphpeft all-linear with optimize=False -- eager, and under torch.compile (compile time reported apart: the warm-up steps'
    time beyond steady steps; graphpeft is compiled first, so an in-process cache can only favour PEFT);
(c) the ONNX Runtime training step of the graphpeft q,v graph (graphpeft.export), when importable;
(d) peak memory of each configuration: torch's own allocation events (torch.profiler, profile_memory)
    over one step, added to the bytes the configuration holds before it (parameters, buffers, optimizer
    state). This counts exactly the tensors a configuration needs, in this one process; RSS cannot (it
    only grows, and the allocator keeps freed pages). ONNX Runtime allocates outside torch: its figure is
    the growth of the process RSS sampled during its steps, not comparable to the others;
(e) inference: an eval forward of the base model, the adapted models, and graphpeft.merge_for_inference;
(f) generation (Llama workload): greedy generate of --gen-new tokens after a --gen-prompt-token prompt
    (batch 1), graphpeft against PEFT, for LoRA q,v, LoRA all-linear, IA3 and prefix tuning (the first
    graphpeft call, which captures and rewrites the cached graphs, is reported apart); and one decode step
    at that cache length: graphpeft's unmerged LoRA (all-linear) step graph against the merged model's step.
(g) gradient checkpointing: the LoRA q,v step time and peak memory of PEFT and graphpeft with and without
    it (PEFT: the model's gradient_checkpointing_enable; graphpeft: the graph cut at its layers, each
    layer recomputed in the backward pass; both non-reentrant).
(h) QLoRA (Llama workload, needs the quant extra): LoRA q,v on the float base and on the same base quantized
    to NF4 (bitsandbytes 4-bit, graphpeft.engine.quantized.quantize_model), PEFT and graphpeft: step time and peak
    memory (held tensors, the packed weights included, plus the step's allocations); the step goal is the
    median over rounds of graphpeft's step ÷ PEFT's in the same round (robust to the machine's slow spells).

Prints tables of times and ratios and the issue's targets (met or missed); writes everything to JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see tools/demo.py: spinning OpenMP waits on a shared VM
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")                # no profiler start/stop chatter
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")   # compile times are cold, not from an earlier run

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import graphpeft  # noqa: E402
from graphpeft.runtime import hub  # noqa: E402

MiB = 2 ** 20
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000)


# -- models and their loss ------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    describe: str
    model: torch.nn.Module                        # the base model, train mode
    batch: dict                                   # model inputs (no labels)
    qv: list                                      # target_modules for "q,v"
    loss: Callable[[Any], torch.Tensor]           # the same loss for every configuration
    labels: Optional[torch.Tensor] = None         # for the ONNX Runtime step (causal LM)


def _get(out: Any, key: str, index: int) -> torch.Tensor:
    return out[key] if isinstance(out, dict) else out[index]


def _pad(mask: torch.Tensor, pad: int) -> torch.Tensor:
    """Every other row ends in ``pad`` masked positions (a padded batch: every attention applies its mask)."""
    mask = mask.clone()
    if pad:
        mask[::2, mask.shape[1] - pad:] = 0
    return mask


def llama_workload(hidden: int, layers: int, vocab: int, batch: int, seq: int, pad: int = 0) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

    def loss(out: Any) -> torch.Tensor:
        logits = _get(out, "logits", 0)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return Workload(f"llama-{hidden}x{layers}", f"Llama-shaped, hidden {hidden}, {layers} layers, vocab {vocab}, "
                    f"{n_params:.1f}M params, batch {batch} x seq {seq}", model,
                    {"input_ids": ids, "attention_mask": _pad(torch.ones_like(ids), pad)}, ["q_proj", "v_proj"], loss,
                    labels=ids)


def minilm_workload(batch: int, seq: int, pad: int = 0) -> Optional[Workload]:
    try:
        model = hub.load_model(None, task="base")              # the real all-MiniLM-L6-v2 (BertModel)
        tokenizer = hub.load_tokenizer(None)
    except graphpeft.GraphPeftError as exc:
        print(f"(skipping all-MiniLM-L6-v2: {exc})")
        return None
    model.train()
    text = ["graph rewriting for parameter-efficient fine-tuning, measured side by side " * 16] * batch
    enc = tokenizer(text, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    enc["attention_mask"] = _pad(enc["attention_mask"], pad)

    def loss(out: Any) -> torch.Tensor:
        return _get(out, "last_hidden_state", 0).square().mean() + _get(out, "pooler_output", 1).square().mean()

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return Workload("minilm", f"all-MiniLM-L6-v2 (BertModel, real weights, {n_params:.1f}M params), "
                    f"batch {batch} x seq {seq}", model, dict(enc), ["query", "value"], loss)


# -- configurations -------------------------------------------------------------------------------

@dataclass
class Config:
    name: str
    model: torch.nn.Module
    step_model: torch.nn.Module              # what the step calls (the model, or its torch.compile wrapper)
    optimizer: Optional[torch.optim.Optimizer]
    floor: bool = False                      # inputs_embeds that require grad; no weight gradients
    times: list = field(default_factory=list)
    warmup: list = field(default_factory=list)
    compiled: bool = False


def _trainable(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(model: torch.nn.Module) -> Optional[torch.optim.Optimizer]:
    params = _trainable(model)
    return torch.optim.AdamW(params, lr=1e-4) if params else None


def build_configs(w: Workload, r: int, alpha: int) -> dict[str, torch.nn.Module]:
    """name -> model, all from the same base weights (PEFT wraps its own copy; graphpeft shares them)."""
    import peft

    models: dict[str, torch.nn.Module] = {}
    floor = copy.deepcopy(w.model).requires_grad_(False)
    models["floor"] = floor
    models["full fine-tuning"] = copy.deepcopy(w.model).requires_grad_(True)
    for label, targets in (("q,v", w.qv), ("all-linear", "all-linear")):
        torch.manual_seed(0)
        models[f"peft lora {label}"] = peft.get_peft_model(
            copy.deepcopy(w.model), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)).train()
        torch.manual_seed(0)
        models[f"graphpeft lora {label}"] = graphpeft.rewrite(
            w.model, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)).train()
    torch.manual_seed(0)          # DoRA (use_dora) on all-linear: PEFT rebuilds B A and the weight norm per module call
    models["peft dora all-linear"] = peft.get_peft_model(copy.deepcopy(w.model), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear", use_dora=True)).train()
    torch.manual_seed(0)
    models["graphpeft dora all-linear"] = graphpeft.rewrite(w.model, graphpeft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear", use_dora=True)).train()
    torch.manual_seed(0)
    models["graphpeft all-linear optimize=False"] = graphpeft.rewrite(
        w.model, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"), optimize=False).train()
    for a, b in (("peft lora q,v", "graphpeft lora q,v"), ("peft lora all-linear", "graphpeft lora all-linear"),
                 ("peft dora all-linear", "graphpeft dora all-linear")):
        na, nb = sum(p.numel() for p in _trainable(models[a])), sum(p.numel() for p in _trainable(models[b]))
        if na != nb:
            print(f"  note: {a} trains {na:,} parameters, {b} {nb:,}")
    return models


def make_step(cfg: Config, w: Workload) -> Callable[[], float]:
    embed = cfg.model.get_input_embeddings() if cfg.floor else None

    def step() -> float:
        if cfg.floor:
            with torch.no_grad():
                embeds = embed(w.batch["input_ids"])
            embeds.requires_grad_(True)
            inputs = {k: v for k, v in w.batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
        else:
            inputs = w.batch
        start = time.perf_counter()
        loss = w.loss(cfg.step_model(**inputs))
        loss.backward()
        if cfg.optimizer is not None:
            cfg.optimizer.step()
            cfg.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


# -- timing -----------------------------------------------------------------------------------------

def median(values: list) -> float:
    return statistics.median(values) if values else float("nan")


def time_round_robin(configs: list[Config], w: Workload, reps: int, warmup: int) -> None:
    steps = {c.name: make_step(c, w) for c in configs}
    for c in configs:
        if warmup:
            c.warmup = [steps[c.name]() for _ in range(warmup)]
    for rep in range(reps):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for c in order:
            c.times.append(steps[c.name]())


def compile_configs(configs: list[Config], w: Workload, warmup: int) -> None:
    """torch.compile each model; its warm-up steps (compilation included) are timed one by one.

    A throwaway compile first takes inductor's one-time start-up off the first configuration's bill.
    """
    tiny = torch.compile(torch.nn.Linear(4, 4))
    tiny(torch.randn(2, 4)).sum().backward()
    for c in configs:
        start = time.perf_counter()
        c.step_model = torch.compile(c.model)
        step = make_step(c, w)
        c.warmup = [step() for _ in range(warmup)]
        c.warmup[0] += time.perf_counter() - start - sum(c.warmup)   # torch.compile() itself, if anything
        print(f"  compiled {c.name}: first steps {', '.join(f'{t:.1f}' for t in c.warmup)} s", flush=True)


def compile_seconds(c: Config) -> float:
    return max(0.0, sum(c.warmup) - len(c.warmup) * median(c.times))


# -- memory -------------------------------------------------------------------------------------------

def _storage_bytes(tensors: list) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _quant_state_tensors(model: torch.nn.Module) -> list:
    """bitsandbytes keeps a 4-bit weight's scales on the parameter (``quant_state``), not as buffers."""
    tensors = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [getattr(state, "absmax", None), getattr(state, "code", None)]
            state = getattr(state, "state2", None)
    return tensors


def held_bytes(c: Config) -> int:
    tensors = [*c.model.parameters(), *c.model.buffers(), *(p.grad for p in c.model.parameters()),
               *_quant_state_tensors(c.model)]
    if c.optimizer is not None:
        tensors += [v for state in c.optimizer.state.values() for v in state.values()]
    return _storage_bytes(tensors)


def step_peak_bytes(c: Config, w: Workload) -> int:
    """The highest sum of torch's allocations minus frees during one step (profiler memory events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    step = make_step(c, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = []

    def walk(node: Any) -> None:
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def measure_memory(configs: list[Config], w: Workload) -> dict[str, float]:
    return {c.name: (held_bytes(c) + step_peak_bytes(c, w)) / MiB for c in configs}


class RssSampler:
    """The process RSS, sampled every few milliseconds in a thread (for what torch's profiler cannot see)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.start_rss = self.rss()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- (a) setup time ------------------------------------------------------------------------------------

def setup_times(w: Workload, r: int, alpha: int, reps: int) -> dict[str, Any]:
    import peft

    out: dict[str, Any] = {}
    for label, targets in (("q,v", w.qv), ("all-linear", "all-linear")):
        ours, theirs, capture_s, pass_s = [], [], [], []
        for _ in range(reps):
            start = time.perf_counter()
            graphpeft.rewrite(w.model, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            gm = graphpeft.capture(w.model)
            capture_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            graphpeft.rewrite(gm, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
            pass_s.append(time.perf_counter() - start)
            base = copy.deepcopy(w.model)
            start = time.perf_counter()
            peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
            theirs.append(time.perf_counter() - start)
        out[label] = {"graphpeft_rewrite_s": median(ours), "peft_get_peft_model_s": median(theirs),
                      "capture_s": median(capture_s), "passes_s": median(pass_s),
                      "passes_share_of_capture": median(pass_s) / median(capture_s)}
    return out


def meta_7b(layers: int, depths: list[int]) -> dict[str, Any]:
    """Capture + rewrite (LoRA all-linear) of Llama-7B-shaped models on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out: dict[str, Any] = {"rss_before_mib": max_rss_mib(), "layers": layers, "by_depth": {}}
    for depth in sorted(set(depths) | {layers}, reverse=True):    # the full depth first: its RSS is the peak
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B, num_hidden_layers=depth)).eval()
        start = time.perf_counter()
        gm = graphpeft.capture(model)
        capture_s = time.perf_counter() - start
        start = time.perf_counter()
        peft_model = graphpeft.rewrite(gm, graphpeft.LoraConfig(r=8, target_modules="all-linear"))
        rewrite_s = time.perf_counter() - start
        out["by_depth"][depth] = {"capture_s": capture_s, "rewrite_s": rewrite_s, "nodes": len(gm.graph.nodes),
                                  "sites": len(peft_model.records)}
        if depth == layers:
            out.update(capture_s=capture_s, rewrite_s=rewrite_s, total_s=capture_s + rewrite_s,
                       peak_rss_mib=max_rss_mib(), sites=len(peft_model.records))
        del model, gm, peft_model
    depths_done = sorted(out["by_depth"])
    lo, hi = out["by_depth"][depths_done[0]], out["by_depth"][depths_done[-1]]
    out["rewrite_per_layer_ms"] = {d: 1000 * out["by_depth"][d]["rewrite_s"] / d for d in depths_done}
    out["rewrite_growth_vs_depth_growth"] = (hi["rewrite_s"] / lo["rewrite_s"]) / (depths_done[-1] / depths_done[0]) \
        if len(depths_done) > 1 else None
    return out


# -- (c) ONNX Runtime ------------------------------------------------------------------------------------

def ort_step(w: Workload, peft_model: Any, reps: int, warmup: int) -> dict[str, Any]:
    """ONNX Runtime training step of the graphpeft graph (graphpeft.export), or why it was skipped."""
    # --- hook: the edge issue's graphpeft.export; skipped with the reason when it is not there ---
    try:
        from graphpeft.export import EdgeTrainer, export_training
        from graphpeft.export.extra import missing_packages
    except ImportError as exc:
        return {"skipped": f"graphpeft.export is not importable ({exc})"}
    missing = missing_packages(training=True)
    if missing:
        return {"skipped": f"missing package(s) {', '.join(missing)} (pip install 'graphpeft[onnx]')"}
    if w.labels is None:
        return {"skipped": f"{w.name} has no training loss graphpeft exports (causal LM / sequence classification)"}
    inputs = {**w.batch, "labels": w.labels}
    with tempfile.TemporaryDirectory(prefix="graphpeft-bench-ort-") as folder:
        try:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_training(peft_model, folder, optimizer="adamw", example_inputs=inputs)
            export_s = time.perf_counter() - start
            trainer = EdgeTrainer(folder)
        except Exception as exc:  # noqa: BLE001 - report, do not stop the benchmark
            return {"skipped": f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        feed = {k: v.numpy() for k, v in inputs.items()}
        with RssSampler() as rss:
            for _ in range(warmup):
                trainer.step(feed)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                trainer.step(feed)
                times.append(time.perf_counter() - start)
        return {"step_s": median(times), "times": times, "export_s": export_s,
                "rss_growth_mib": (rss.peak - rss.start_rss) / MiB}


# -- (e) inference -----------------------------------------------------------------------------------------

def inference_times(w: Workload, models: dict[str, torch.nn.Module], reps: int) -> dict[str, float]:
    runs: dict[str, Callable[[], Any]] = {}
    base = copy.deepcopy(w.model).eval()
    runs["base model"] = lambda: base(**w.batch)
    for name in ("peft lora all-linear", "graphpeft lora all-linear"):
        m = models[name]
        m.eval()
        runs[name] = (lambda m=m: m(**w.batch))
    merged_peft = copy.deepcopy(models["peft lora all-linear"]).merge_and_unload().eval()
    runs["peft merge_and_unload"] = lambda: merged_peft(**w.batch)
    merged = graphpeft.merge_for_inference(models["graphpeft lora all-linear"])
    runs["graphpeft merge_for_inference"] = lambda: merged(**w.batch)
    times: dict[str, list] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for rep in range(reps):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    for name in ("peft lora all-linear", "graphpeft lora all-linear"):
        models[name].train()
    return {k: median(v) for k, v in times.items()}


def generation_times(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """(f): generate time, graphpeft / PEFT, and the unmerged / merged decode step."""
    import peft

    base = copy.deepcopy(w.model).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.gen_prompt), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen_new, min_new_tokens=args.gen_new,
                  do_sample=False, pad_token_id=0, eos_token_id=None)
    configs = {
        "lora q,v": (graphpeft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=w.qv),
                     peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=w.qv)),
        "lora all-linear": (graphpeft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear"),
                            peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear")),
        "ia3": (graphpeft.IA3Config(task_type="CAUSAL_LM"), peft.IA3Config(task_type="CAUSAL_LM")),
        "prefix tuning": (graphpeft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
                          peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    }
    runs: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}
    ours: dict[str, Any] = {}
    for name, (mine, theirs) in configs.items():
        torch.manual_seed(0)
        ours[name] = graphpeft.rewrite(base, mine).eval()
        start = time.perf_counter()
        with torch.no_grad():
            ours[name].generate(**kwargs)            # captures and rewrites the prefill and step graphs
        first[name] = time.perf_counter() - start
        torch.manual_seed(0)
        theirs_model = peft.get_peft_model(copy.deepcopy(base), theirs).eval()
        runs[f"graphpeft {name}"] = (lambda m=ours[name]: m.generate(**kwargs))
        runs[f"peft {name}"] = (lambda m=theirs_model: m.generate(**kwargs))
    times: dict[str, list] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(args.gen_reps):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"prompt_tokens": args.gen_prompt, "new_tokens": args.gen_new,
                              "generate_s": {k: median(v) for k, v in times.items()}, "first_generate_s": first}
    result["step_ms"] = _decode_steps(ours["lora all-linear"], ids, args.reps)
    return result


def _decode_steps(peft_model: Any, ids: torch.Tensor, reps: int) -> dict[str, float]:
    """One decode step at a cache of the prompt's length: graphpeft's unmerged step graph, the merged model's."""
    from graphpeft.runtime.generation import _graphs, _run_graph

    merged = peft_model.merge_and_unload().eval()
    graphs = _graphs(peft_model)
    length = ids.shape[1]
    mask, positions = torch.ones(1, length + 1, dtype=torch.long), torch.tensor([[length]])
    token = ids[:, -1:]
    with torch.no_grad():
        cache = _run_graph(graphs.prefill, None, input_ids=ids, attention_mask=mask[:, :length],
                           position_ids=torch.arange(length)[None], use_cache=True, logits_to_keep=1)["cache"]
        merged_cache = merged(input_ids=ids, attention_mask=mask[:, :length], use_cache=True).cache
        steps = {
            "graphpeft unmerged lora all-linear": lambda: graphs.step(input_ids=token, attention_mask=mask,
                                                                      position_ids=positions, cache=cache,
                                                                      use_cache=True),
            "merged model (merge_and_unload)": lambda: (merged(input_ids=token, attention_mask=mask,
                                                               position_ids=positions, cache=merged_cache,
                                                               use_cache=True), merged_cache.crop(-1)),
        }
        times: dict[str, list] = {k: [] for k in steps}
        for fn in steps.values():
            fn()
        for _ in range(max(reps, 5)):
            for name, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: 1000 * median(v) for k, v in times.items()}
# -- (g) gradient checkpointing -------------------------------------------------------------------------------

def checkpointing(w: Workload, r: int, alpha: int, reps: int, warmup: int) -> dict[str, Any]:
    """LoRA q,v with and without gradient checkpointing, PEFT and graphpeft: step time and peak memory."""
    import peft

    models: dict[str, torch.nn.Module] = {}
    for on in (False, True):
        suffix = " + checkpointing" if on else ""
        torch.manual_seed(0)
        theirs = peft.get_peft_model(copy.deepcopy(w.model),
                                     peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=w.qv)).train()
        torch.manual_seed(0)
        ours = graphpeft.rewrite(w.model, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=w.qv)).train()
        if on:
            theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            ours.gradient_checkpointing_enable()
        models[f"peft lora q,v{suffix}"], models[f"graphpeft lora q,v{suffix}"] = theirs, ours
    configs = [Config(n, m, m, _optimizer(m)) for n, m in models.items()]
    time_round_robin(configs, w, reps, warmup)
    return {"step_s": {c.name: median(c.times) for c in configs}, "peak_mib": measure_memory(configs, w)}


def print_checkpointing(res: dict[str, Any]) -> None:
    _print_variants("(g) gradient checkpointing (LoRA q,v)", res, " + checkpointing", "plain")


def _print_variants(title: str, res: dict[str, Any], suffix: str, plain: str) -> None:
    """Step time and peak memory of each configuration, against its plain twin (``suffix`` removed) and,
    for graphpeft's, against PEFT's."""
    step, mem = res["step_s"], res["peak_mib"]
    print(f"\n{title:<46} step ms  /{plain:<6} peak MiB  /{plain:<6}  step /peft  peak /peft")
    for n in step:
        twin = n.replace(suffix, "")
        peer = n.replace("graphpeft", "peft") if n.startswith("graphpeft") else None
        print(f"    {n:<42} {1000 * step[n]:>7.1f} {step[n] / step[twin]:>7.3f} {mem[n]:>9.1f} "
              f"{mem[n] / mem[twin]:>7.3f} {_fmt(_ratio(step[n], step.get(peer))) if peer else '':>12} "
              f"{_fmt(_ratio(mem[n], mem.get(peer))) if peer else '':>11}")


# -- (h) QLoRA ------------------------------------------------------------------------------------------------

def qlora(w: Workload, r: int, alpha: int, reps: int, warmup: int) -> dict[str, Any]:
    """LoRA q,v on the float base and on its NF4 copy, PEFT and graphpeft: step time and peak memory."""
    import peft

    from graphpeft.engine.quantized import quantize_model

    nf4 = quantize_model(copy.deepcopy(w.model), "nf4")
    models: dict[str, torch.nn.Module] = {}
    for suffix, base in (("", w.model), (" on nf4", nf4)):
        torch.manual_seed(0)
        models[f"peft lora q,v{suffix}"] = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=w.qv)).train()
        torch.manual_seed(0)
        models[f"graphpeft lora q,v{suffix}"] = graphpeft.rewrite(
            base, graphpeft.LoraConfig(r=r, lora_alpha=alpha, target_modules=w.qv)).train()
    configs = [Config(n, m, m, _optimizer(m)) for n, m in models.items()]
    time_round_robin(configs, w, reps, warmup)
    times = {c.name: c.times for c in configs}
    # each round times every configuration once: graphpeft's step over PEFT's in the same round, so a
    # slow spell of the machine divides out (a ratio of medians carries it into one side)
    paired = {n: median([a / b for a, b in zip(t, times[n.replace("graphpeft", "peft")])])
              for n, t in times.items() if n.startswith("graphpeft")}
    return {"step_s": {n: median(t) for n, t in times.items()}, "peak_mib": measure_memory(configs, w),
            "paired_step_ratio": paired}


def print_qlora(res: dict[str, Any]) -> None:
    _print_variants("(h) QLoRA (LoRA q,v)", res, " on nf4", "float")
    for name, ratio in res.get("paired_step_ratio", {}).items():
        print(f"    {name}: step / PEFT's in the same round, median over rounds {ratio:.3f}")


# -- one workload -------------------------------------------------------------------------------------------

def bench_workload(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {w.name}: {w.describe}", flush=True)
    result: dict[str, Any] = {"describe": w.describe}
    print("(a) setup: capture + rewrite vs peft.get_peft_model ...", flush=True)
    result["setup"] = setup_times(w, args.r, args.alpha, args.setup_reps)

    models = build_configs(w, args.r, args.alpha)
    eager = [Config(n, m, m, _optimizer(m), floor=(n == "floor")) for n, m in models.items()]
    print(f"(b) train step, eager: {len(eager)} configurations x {args.reps} reps ...", flush=True)
    time_round_robin(eager, w, args.reps, args.warmup)
    result["eager_step_s"] = {c.name: median(c.times) for c in eager}
    result["eager_times"] = {c.name: c.times for c in eager}
    print("(d) peak memory (torch allocation events over one step) ...", flush=True)
    result["peak_mib"] = measure_memory(eager, w)

    if args.compile:
        print("(b) train step, torch.compile ...", flush=True)
        order = sorted(models, key=lambda n: not n.startswith("graphpeft"))   # graphpeft first (see docstring)
        compiled = [Config(n, models[n], models[n], _optimizer(models[n]), floor=(n == "floor"), compiled=True)
                    for n in order if n != "graphpeft all-linear optimize=False"]
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compile_configs(compiled, w, args.compile_warmup)
        time_round_robin(compiled, w, args.reps, 0)
        result["compiled_step_s"] = {c.name: median(c.times) for c in compiled}
        result["compile_s"] = {c.name: compile_seconds(c) for c in compiled}
        result["compiled_peak_mib"] = measure_memory(compiled, w)

    if args.ort:
        print("(c) ONNX Runtime training step ...", flush=True)
        result["ort"] = ort_step(w, models["graphpeft lora q,v"], args.reps, args.warmup)
        if "skipped" in result["ort"]:
            print(f"  skipped: {result['ort']['skipped']}")
    print("(e) inference forward ...", flush=True)
    result["inference_s"] = inference_times(w, models, args.reps)
    if args.generation and w.name.startswith("llama"):
        print(f"(f) generation: {args.gen_prompt}-token prompt + {args.gen_new} new tokens ...", flush=True)
        result["generation"] = generation_times(w, args)
    if args.checkpointing:
        del models
        print("(g) gradient checkpointing ...", flush=True)
        result["checkpointing"] = checkpointing(w, args.r, args.alpha, args.reps, args.warmup)
    if args.qlora and w.name.startswith("llama"):
        print("(h) QLoRA: LoRA on an NF4 base ...", flush=True)
        if importlib.util.find_spec("bitsandbytes") is None:
            print("  skipped: bitsandbytes is not installed (pip install 'graphpeft[quant]')")
        else:
            result["qlora"] = qlora(w, args.r, args.alpha, args.reps, args.warmup)
    return result


# -- report ----------------------------------------------------------------------------------------------

def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_workload(name: str, res: dict[str, Any]) -> None:
    print(f"\n### {name}: {res['describe']}")
    print(f"\n(a) setup (median){'':<19} graphpeft.rewrite s  peft.get_peft_model s  capture s  passes s  passes/capture")
    for label, s in res["setup"].items():
        print(f"    {label:<32} {s['graphpeft_rewrite_s']:>19.2f} {s['peft_get_peft_model_s']:>22.3f} "
              f"{s['capture_s']:>10.2f} {s['passes_s']:>9.3f} {s['passes_share_of_capture']:>14.1%}")
    eager, comp = res["eager_step_s"], res.get("compiled_step_s", {})
    ctime, mem, cmem = res.get("compile_s", {}), res["peak_mib"], res.get("compiled_peak_mib", {})
    floor, cfloor = eager["floor"], comp.get("floor")
    print(f"\n(b, d) train step (median){'':<11} eager ms  /floor   /peft  compiled ms  /floor   /peft  compile s  "
          f"peak MiB   /peft  compiled peak MiB")
    for n in eager:
        peer = n.replace("graphpeft", "peft") if n.startswith(("graphpeft lora", "graphpeft dora")) else None
        print(f"    {n:<35} {1000 * eager[n]:>8.1f} {_fmt(_ratio(eager[n], floor)):>7} "
              f"{_fmt(_ratio(eager[n], eager.get(peer))) if peer else '':>7} "
              f"{_fmt(1000 * comp[n] if n in comp else None, '.1f'):>12} {_fmt(_ratio(comp.get(n), cfloor)):>7} "
              f"{_fmt(_ratio(comp.get(n), comp.get(peer))) if peer else '':>7} {_fmt(ctime.get(n), '.1f'):>10} "
              f"{mem[n]:>9.1f} {_fmt(_ratio(mem[n], mem.get(peer))) if peer else '':>7} "
              f"{_fmt(cmem.get(n), '.1f'):>18}")
    ort = res.get("ort")
    if ort is not None:
        if "skipped" in ort:
            print(f"\n(c) ONNX Runtime step: skipped -- {ort['skipped']}")
        else:
            ref = eager["graphpeft lora q,v"]
            print(f"\n(c) ONNX Runtime step (graphpeft lora q,v): {1000 * ort['step_s']:.1f} ms = "
                  f"{ort['step_s'] / ref:.3f}x the PyTorch eager step; export {ort['export_s']:.1f} s; "
                  f"RSS growth while stepping {ort['rss_growth_mib']:.0f} MiB (ONNX Runtime's allocator)")
    inf = res["inference_s"]
    print(f"\n(e) inference forward (eval, no_grad, median){'':<3}  ms    /base")
    for n, t in inf.items():
        print(f"    {n:<44} {1000 * t:>7.1f} {t / inf['base model']:>7.3f}")
    gen = res.get("generation")
    if gen is not None:
        g = gen["generate_s"]
        print(f"\n(f) generate, {gen['prompt_tokens']}-token prompt + {gen['new_tokens']} new (median)  graphpeft s  "
              f"PEFT s  graphpeft/PEFT  first graphpeft call s")
        for name, first in gen["first_generate_s"].items():
            print(f"    {name:<44} {g[f'graphpeft {name}']:>11.3f} {g[f'peft {name}']:>7.3f} "
                  f"{g[f'graphpeft {name}'] / g[f'peft {name}']:>15.3f} {first:>22.2f}")
        for name, ms in gen["step_ms"].items():
            print(f"    decode step at {gen['prompt_tokens']} cached, {name:<38} {ms:>7.2f} ms")
    if "checkpointing" in res:
        print_checkpointing(res["checkpointing"])
    if "qlora" in res:
        print_qlora(res["qlora"])


def targets(results: dict[str, Any]) -> list[tuple[str, Optional[float], float, Optional[bool]]]:
    """(target, measured, limit, met) for the issue's item 4, on the Llama-shaped workload."""
    rows: list = []
    llama = next((v for k, v in results["workloads"].items() if k.startswith("llama")), None)
    if llama is not None:
        e, c, ct, mem = (llama["eager_step_s"], llama.get("compiled_step_s", {}), llama.get("compile_s", {}),
                         llama["peak_mib"])
        rows += [
            ("eager LoRA(all-linear) / eager floor", _ratio(e["graphpeft lora all-linear"], e["floor"]), 1.10),
            ("eager LoRA(all-linear) / PEFT eager", _ratio(e["graphpeft lora all-linear"], e["peft lora all-linear"]), 0.85),
            ("eager LoRA(q,v) / eager floor", _ratio(e["graphpeft lora q,v"], e["floor"]), 1.02),
        ]
        if "graphpeft dora all-linear" in e:
            rows.append(("eager DoRA(all-linear) / PEFT DoRA eager",
                         _ratio(e["graphpeft dora all-linear"], e["peft dora all-linear"]), 0.8))
            rows.append(("compiled DoRA(all-linear) / compiled PEFT DoRA",
                         _ratio(c.get("graphpeft dora all-linear"), c.get("peft dora all-linear")), 0.8))
        for label in ("q,v", "all-linear"):
            rows.append((f"compiled LoRA({label}) / compiled PEFT",
                         _ratio(c.get(f"graphpeft lora {label}"), c.get(f"peft lora {label}")), 0.95))
            rows.append((f"compile time LoRA({label}) / PEFT's",
                         _ratio(ct.get(f"graphpeft lora {label}"), ct.get(f"peft lora {label}")), 1.0))
        for label in ("q,v", "all-linear"):
            rows.append((f"peak memory LoRA({label}) / PEFT's", _ratio(mem[f"graphpeft lora {label}"],
                                                                       mem[f"peft lora {label}"]), 1.0))
        for label, setup in llama["setup"].items():
            rows.append((f"passes / capture time ({label})", setup["passes_share_of_capture"], 0.10))
        gen = llama.get("generation")
        if gen is not None:
            g = gen["generate_s"]
            for name in gen["first_generate_s"]:
                rows.append((f"generate {name} / PEFT generate", _ratio(g[f"graphpeft {name}"], g[f"peft {name}"]), 1.0))
            steps = list(gen["step_ms"].values())
            rows.append(("unmerged LoRA decode step / merged decode step", _ratio(steps[0], steps[1]), 1.05))
        q = llama.get("qlora")
        if q is not None:
            st, pk = q["step_s"], q["peak_mib"]
            rows.append(("QLoRA (NF4) peak memory / PEFT QLoRA's", _ratio(pk["graphpeft lora q,v on nf4"],
                                                                         pk["peft lora q,v on nf4"]), 1.0))
            paired = q.get("paired_step_ratio", {}).get("graphpeft lora q,v on nf4")
            rows.append(("QLoRA (NF4) step / PEFT QLoRA step (paired by round)",
                         paired if paired is not None else _ratio(st["graphpeft lora q,v on nf4"],
                                                                  st["peft lora q,v on nf4"]), 1.0))
        ort = llama.get("ort", {})
        rows.append(("ONNX Runtime step / PyTorch eager step",
                     _ratio(ort.get("step_s"), e["graphpeft lora q,v"]) if "step_s" in ort else None, 0.8))
    meta = results.get("meta_7b")
    if meta is not None:
        rows.append((f"7B-shape capture + rewrite on meta, s ({meta['layers']} layers)", meta["total_s"], 15.0))
        rows.append(("7B-shape peak RSS, MiB (whole process)", meta["peak_rss_mib"], 1024.0))
        growth = meta.get("rewrite_growth_vs_depth_growth")
        rows.append(("pass time growth / depth growth (1 = linear)", growth, 1.25))
    return [(name, value, limit, None if value is None else value <= limit) for name, value, limit in rows]


def print_targets(rows: list) -> None:
    print("\n### targets (issue 6, item 4; issue 15: DoRA; reported, not asserted)")
    for name, value, limit, met in rows:
        verdict = "n/a " if met is None else ("met " if met else "MISS")
        print(f"  {verdict} {name:<58} {_fmt(value):>9}  (<= {limit:g})")


# -- main ----------------------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small Llama, eager only (under a minute)")
    parser.add_argument("--models", nargs="+", choices=["llama", "minilm"], help="default: both (quick: llama)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pad", type=int, default=0,
                        help="mask out the last PAD positions of every other row (default 0: no padding)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default 16: scaling 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--setup-reps", type=int, default=3)
    parser.add_argument("--compile-warmup", type=int, default=3, help="compiled warm-up steps (compile time)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also torch.compile every configuration (default: on, off with --quick)")
    parser.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True,
                        help="ONNX Runtime training step when graphpeft.export is importable")
    parser.add_argument("--meta-layers", type=int, default=32, help="layers of the Llama-7B-shaped meta model")
    parser.add_argument("--meta-depths", type=int, nargs="*", default=None,
                        help="extra depths for the pass-linearity check (default 8 16; quick: 2)")
    parser.add_argument("--no-meta", dest="meta", action="store_false", help="skip the 7B-shape meta section")
    parser.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                        help="(f) generate and decode-step timings on the Llama workload")
    parser.add_argument("--gen-prompt", type=int, default=400, help="prompt tokens for (f) (default 400; quick: 64)")
    parser.add_argument("--gen-new", type=int, default=48, help="new tokens for (f) (default 48; quick: 8)")
    parser.add_argument("--gen-reps", type=int, default=3, help="timed generate calls per configuration (default 3)")
    parser.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=True,
                        help="(h) LoRA on the float base and on its NF4 copy, PEFT and graphpeft (default: on; "
                             "skipped without bitsandbytes)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="(g) gradient checkpointing with and without, PEFT and graphpeft (default: on)")
    parser.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 128, 2, 1000, 2, 64
        args.reps, args.setup_reps, args.meta_layers = min(args.reps, 5), 1, 4
        args.models = args.models or ["llama"]
        args.compile = bool(args.compile)
        args.meta_depths = [2] if args.meta_depths is None else args.meta_depths
        args.gen_prompt, args.gen_new, args.gen_reps = min(args.gen_prompt, 64), min(args.gen_new, 8), 1
    args.models = args.models or ["llama", "minilm"]
    args.compile = True if args.compile is None else args.compile
    args.meta_depths = [8, 16] if args.meta_depths is None else args.meta_depths

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import peft

    started = time.time()
    results: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv, "args": vars(args),
        "env": {"torch": torch.__version__, "peft": peft.__version__, "graphpeft": graphpeft.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "load_avg_start": os.getloadavg()},
        "workloads": {},
    }
    print(f"graphpeft bench: torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.meta:
        print(f"(a) Llama-7B shape on the meta device, {args.meta_layers} layers (+ depths {args.meta_depths}) ...",
              flush=True)
        results["meta_7b"] = meta_7b(args.meta_layers, args.meta_depths)
    for name in args.models:
        w = (llama_workload(args.hidden, args.layers, args.vocab, args.batch, args.seq, args.pad) if name == "llama"
             else minilm_workload(args.batch, args.seq, args.pad))
        if w is not None:
            results["workloads"][w.name] = bench_workload(w, args)
    results["env"]["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started

    for name, res in results["workloads"].items():
        print_workload(name, res)
    meta = results.get("meta_7b")
    if meta is not None:
        print(f"\n### Llama-7B shape on meta ({meta['layers']} layers, {meta['sites']} LoRA sites): capture "
              f"{meta['capture_s']:.2f} s + rewrite {meta['rewrite_s']:.2f} s = {meta['total_s']:.2f} s; peak RSS "
              f"{meta['peak_rss_mib']:.0f} MiB (after imports: {meta['rss_before_mib']:.0f} MiB)")
        per_layer = ", ".join(f"{d}: {v:.1f}" for d, v in meta["rewrite_per_layer_ms"].items())
        print(f"    rewrite ms per layer by depth: {per_layer}")
    results["targets"] = [dict(target=n, measured=v, limit=lim, met=m) for n, v, lim, m in targets(results)]
    print_targets(targets(results))
    print(f"\nload average {results['env']['load_avg_start'][0]:.2f} at start, {results['env']['load_avg_end'][0]:.2f} "
          f"at the end; {results['wall_s']:.0f} s in all")
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
