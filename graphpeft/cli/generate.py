"""``graphpeft generate`` and ``graphpeft merge``: use an adapter folder.

    graphpeft generate ADAPTER [MODEL] --prompt TEXT [--prompt TEXT ...] | --prompts FILE.jsonl
                       [--max-new-tokens 64 --do-sample --temperature 0.7 --top-p 0.9 --num-beams 1 --seed 0 --json]
    graphpeft merge ADAPTER [MODEL] -o DIR        a full model folder (weights merged, config, tokenizer)

ADAPTER is a folder written by ``graphpeft rewrite`` / ``train`` / ``save_pretrained`` (or PEFT); MODEL
defaults to the base model it names. Generation is ``GraphPeftModel.generate`` (transformers' own loop,
graphpeft's cached graphs); tokens stream to the terminal as they come, one prompt after the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import click

from graphpeft.runtime import progress

from graphpeft.cli.params import INT, POSITIVE_FLOAT, POSITIVE_INT, _Command, _examples, _flag, _json_option, _opt
from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import EXTRA_INPUTS
from graphpeft.runtime.outputs import staged_output

_ADAPTER_HELP = "adapter folder written by 'graphpeft rewrite', 'graphpeft train' or save_pretrained (or PEFT)"
_BASE_HELP = "base model folder or hub id (default: the model ADAPTER names)"


def commands() -> dict[str, click.Command]:
    adapter = [click.Argument(["adapter"], metavar="ADAPTER"), click.Argument(["model"], required=False,
                                                                             metavar="[MODEL]")]
    remote = _flag("--trust-remote-code", "trust_remote_code",
                   help="allow the model folder's own Python code to run (off by default)")
    generate = _Command(
        "generate", arguments={"ADAPTER": _ADAPTER_HELP, "MODEL": _BASE_HELP},
        params=[*adapter,
                _opt("--prompt", "prompt", multiple=True, metavar="TEXT", help="a prompt (repeatable)"),
                _opt("--prompts", "prompts", default=None, metavar="FILE",
                     help="JSONL file of prompts, one {\"prompt\": ...} (or {\"text\": ...}) per line"),
                _opt("--max-new-tokens", "max_new_tokens", type=POSITIVE_INT, default=64, metavar="N",
                     help="tokens to generate per prompt (default: 64)"),
                _flag("--do-sample", "do_sample", help="sample instead of greedy / beam search"),
                _opt("--temperature", "temperature", type=POSITIVE_FLOAT, default=None, metavar="T",
                     help="sampling temperature (with --do-sample)"),
                _opt("--top-p", "top_p", type=POSITIVE_FLOAT, default=None, metavar="P",
                     help="nucleus sampling mass (with --do-sample)"),
                _opt("--num-beams", "num_beams", type=POSITIVE_INT, default=1, metavar="N",
                     help="beam search with N beams (default: 1, greedy)"),
                _opt("--task-id", "task_id", type=INT, default=None, metavar="N",
                     help="the task of a multitask prompt tuning adapter"),
                _opt("--seed", "seed", type=INT, default=0, metavar="N", help="seed for sampling (default: 0)"),
                remote, _json_option()],
        short_help="generate text with an adapter (KV cache, streamed)",
        help="Generate text from prompts with the adapter of ADAPTER on its base model: transformers' generate "
             "over graphpeft's cached graphs. Tokens stream to the terminal as they come.",
        epilog=_examples("graphpeft generate adapter --prompt 'Once upon a time' --max-new-tokens 32",
                         "graphpeft generate adapter path/to/model --prompts prompts.jsonl --num-beams 4 --json",
                         "graphpeft generate adapter --prompt 'Hi' --do-sample --temperature 0.7 --top-p 0.9"))
    merge = _Command(
        "merge", arguments={"ADAPTER": _ADAPTER_HELP, "MODEL": _BASE_HELP},
        params=[*adapter,
                _opt("-o", "--output", "output", required=True, metavar="DIR",
                     help="output model folder; must be absent or empty unless --overwrite"),
                _flag("--overwrite", "overwrite", help="replace DIR if it exists and is not empty"),
                remote, _json_option()],
        short_help="merge an adapter into its base model and write a model folder",
        help="Merge a LoRA, AdaLoRA or IA3 adapter into the weights of its base model and write DIR: config, "
             "weights and tokenizer, a folder AutoModelForCausalLM (or the model's own class) loads. Prompt "
             "and prefix methods add tokens, not weights: they cannot be merged.",
        epilog=_examples("graphpeft merge adapter -o merged-model", "graphpeft merge adapter path/to/model -o merged"))
    return {"generate": generate, "merge": merge}


# -- loading --------------------------------------------------------------------------------------------

def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(GraphPeftModel with ADAPTER's adapter, tokenizer, base model name); the model must generate."""
    import graphpeft
    from graphpeft.runtime import hub
    from graphpeft.export.commands import _base_model, _read_json
    from graphpeft.runtime.io import read_adapter

    folder = Path(args.adapter).expanduser()
    config, _ = read_adapter(folder)
    name = _base_model(folder, args.model, config, _read_json(folder / "rewrite.json"))
    if config.get("task_type") == "SEQ_CLS" or _read_json(folder / "train.json").get("task") == "seq-cls":
        raise GraphPeftError(f"{folder} is an adapter of a sequence-classification model; generate and merge "
                             f"need a language model (causal LM or encoder-decoder)")
    tokenizer = hub.load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    with progress.spinner(f"loading {name} and the adapter {folder}"):
        model = hub.load_model(name, trust_remote_code=args.trust_remote_code)
        if not model.can_generate():
            raise GraphPeftError(f"{name} ({type(model).__name__}) has no language-model head; generate and merge "
                                 f"need a *ForCausalLM or *ForConditionalGeneration model")
        peft_model = graphpeft.from_pretrained(model, str(folder))
    return peft_model, tokenizer, name


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or ())
    if args.prompts:
        path = Path(args.prompts).expanduser()
        if not path.is_file():
            raise GraphPeftError(f"prompt file {path} does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GraphPeftError(f"{path}:{number}: not JSON ({exc.msg})") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise GraphPeftError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
            prompts.append(text)
        if not prompts:
            raise GraphPeftError(f"prompt file {path} holds no prompts; write one {{\"prompt\": ...}} per line")
    if not prompts:
        raise GraphPeftError("no prompt given; pass --prompt TEXT or --prompts FILE.jsonl")
    if any(not p.strip() for p in prompts):
        raise GraphPeftError("a prompt is empty; give each prompt some text")
    return prompts


def _max_positions(model: Any) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# -- commands -------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace, method: registry.Method) -> dict:
    import torch
    from transformers import TextStreamer

    prompts = _prompts(args)
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        raise GraphPeftError("--temperature and --top-p need --do-sample")
    peft_model, tokenizer, name = _load(args)
    config = next(iter(peft_model.peft_config.values()))
    virtual = getattr(config, "num_virtual_tokens", None) or 0
    limit = _max_positions(peft_model.__dict__["_source_model"])
    encoder_decoder = bool(getattr(peft_model.__dict__["_source_model"].config, "is_encoder_decoder", False))
    extra: dict[str, Any] = {}
    if "task_ids" in peft_model.graph_module.meta.get(EXTRA_INPUTS, {}):
        if args.task_id is None:
            raise GraphPeftError("this multitask prompt tuning adapter needs --task-id N")
        extra["task_ids"] = torch.tensor([args.task_id])
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    outputs = []
    for prompt in prompts:
        encoded = {k: v for k, v in tokenizer(prompt, return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
        length = int(encoded["input_ids"].shape[1])
        needed = length + virtual + (0 if encoder_decoder else args.max_new_tokens)
        if limit is not None and needed > limit:
            raise GraphPeftError(f"the prompt {prompt[:40]!r} has {length} tokens; with {args.max_new_tokens} new "
                                 f"tokens{f' and {virtual} virtual' if virtual else ''} that is beyond the model's "
                                 f"{limit} positions; shorten it or lower --max-new-tokens")
        torch.manual_seed(args.seed)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) \
            if args.num_beams == 1 and not args.json else None
        if streamer is not None:
            print(prompt, end="" if not encoder_decoder else "\n", flush=True)
        ids = peft_model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                  num_beams=args.num_beams, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                  **sampling, **extra)
        new = ids[0, 0 if encoder_decoder else length:]
        completion = tokenizer.decode(new, skip_special_tokens=True)
        if streamer is None:
            print(f"{prompt}{chr(10) if encoder_decoder else ''}{completion}")
        outputs.append({"prompt": prompt, "completion": completion, "tokens": new.tolist()})
    return {"command": "generate", "adapter": str(args.adapter), "model": name, "method": registry.method_for_config(
        config).name, "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": args.num_beams,
        "seed": args.seed, "outputs": outputs}


def cmd_merge(args: argparse.Namespace, method: registry.Method) -> dict:
    from graphpeft.runtime.outputs import check_output

    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    peft_model, tokenizer, name = _load(args)
    merged = peft_model.merge_and_unload()
    with staged_output(out, args.overwrite) as tmp:
        with progress.spinner(f"writing {out}"):
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
    print(f"merged {args.adapter} into {name} ({type(merged).__name__}); wrote {out}/ ({', '.join(files)})")
    return {"command": "merge", "adapter": str(args.adapter), "model": name, "class": type(merged).__name__,
            "output": str(out), "files": files}


COMMANDS = {"generate": cmd_generate, "merge": cmd_merge}
