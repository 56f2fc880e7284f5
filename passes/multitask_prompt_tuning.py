"""MultiTask Prompt Tuning: a shared prompt scaled elementwise by a task-specific low-rank matrix,
selected by a ``task_ids`` input, with Hugging Face PEFT's semantics
(peft.tuners.multitask_prompt_tuning.MultitaskPromptEmbedding).

Maths: with the shared table P [T, H] (T = num_virtual_tokens x num_transformer_submodules), per task
k the factors C_k [T, r] (prefix_task_cols) and R_k [r, H] (prefix_task_rows), r = num_ranks, and
task ids t [B],

    prompts_b = P * (C_{t_b} R_{t_b})        [B, T, H]      (elementwise product)

then, with V = num_virtual_tokens and E the token-embedding module,

    h = E(x) [B, L, H]  ->  [prompts[:, :V] ; E(x)] [B, V+L, H],  mask m -> [1_V ; m],  token types -> [0_V ; t]

With num_transformer_submodules = 2 (task_type SEQ_2_SEQ_LM) the decoder sequence gets the other
V rows the same way (decoder mask extended, labels padded with -100), as PEFT's seq2seq forward does.
Generation captures the encoder and the decoder apart (graph meta ``MODEL_HALF``): the encoder graph
gets the first V rows, the decoder graph the other V (none with num_transformer_submodules = 1).

before:                                    after:
    input_ids ─ embedding(W) ─ h ─ ...         input_ids ─ cat(0…) ─ embedding(W) ─ h ─ slice(V:) ──┐
    attention_mask ─────────── ...             task_ids ─┬ index_select(C) ─ matmul ─ mul(P) ─ [:, :V] ─ cat ─ ...
                                                         └ index_select(R) ─┘
                                               attention_mask ─ cat(1…) ─ ...

``task_ids`` becomes a required keyword input of the rewritten model (a missing one, or an id
outside 0 .. num_tasks-1, is a one-line error). Parameters live at ``prompt_encoder.<adapter>.``
``embedding.weight``, ``.prefix_task_cols``, ``.prefix_task_rows`` and are saved as ``prompt_embeddings``,
``prefix_task_cols``, ``prefix_task_rows``. Inits: RANDOM / SAMPLE_VOCAB / TEXT for P (as prompt
tuning), C and R normal(0, 0.02); from a source checkpoint (``prompt_tuning_init_state_dict_path``,
safetensors, or a torch file read with ``weights_only=True``): AVERAGE_SOURCE_TASKS (mean of the
source tasks' C and R), EXACT_SOURCE_TASK (task ``prompt_tuning_init_task``'s), ONLY_SOURCE_SHARED
(P only).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.config import PromptLearningConfig
from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import MODEL_HALF, Rewriter
from graphpeft.engine.rule import RulePass
from graphpeft.engine.virtual_tokens import (TokenLookup, TokenLookupRule, extend_sequence, fill_unset, initial_table,
                                      model_dims, replace_leading_rows, token_lookup)

aten = torch.ops.aten
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT") + SOURCE_INITS
_RESOLVED = ("token_dim", "num_transformer_submodules", "num_layers", "num_attention_heads")


@dataclass
class MultitaskPromptTuningConfig(PromptLearningConfig):
    """PEFT's MultitaskPromptTuningConfig fields and defaults."""

    peft_type = "MULTITASK_PROMPT_TUNING"

    prompt_tuning_init: str = field(default="RANDOM", metadata={
        "cli": "--init", "help": "RANDOM, SAMPLE_VOCAB, TEXT, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or "
                                 "ONLY_SOURCE_SHARED"})
    prompt_tuning_init_text: Optional[str] = field(default=None, metadata={
        "cli": "--init-text", "help": "the text whose token embeddings start the shared prompt (with --init TEXT)"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={
        "cli": "--tokenizer", "help": "the model's tokenizer, a folder or cached hub id (with --init TEXT)"})
    tokenizer_kwargs: Optional[dict] = None
    prompt_tuning_init_state_dict_path: Optional[str] = field(default=None, metadata={
        "cli": "--init-from", "help": "source-task adapter weights (safetensors) for the *_SOURCE_* inits"})
    prompt_tuning_init_task: Optional[int] = field(default=0, metadata={
        "cli": "--init-task", "help": "source task id for EXACT_SOURCE_TASK"})
    num_ranks: Optional[int] = field(default=1, metadata={"cli": "--num-ranks", "help": "rank of each task's factors"})
    num_tasks: Optional[int] = field(default=1, metadata={"cli": "--num-tasks", "help": "number of tasks"})

    def validate(self) -> None:
        super().validate()
        if isinstance(self.prompt_tuning_init, enum.Enum):        # peft's enum members too
            self.prompt_tuning_init = self.prompt_tuning_init.value
        init = self.prompt_tuning_init
        if init not in INITS:
            raise GraphPeftError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {init!r}")
        for name in ("num_tasks", "num_ranks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GraphPeftError(f"{name} must be a positive integer, got {value!r}")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise GraphPeftError("prompt_tuning_init='TEXT' needs the model's tokenizer: set tokenizer_name_or_path "
                                 "(--tokenizer PATH), a local folder or a cached hub id")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise GraphPeftError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (--init-text '...')")
        if self.tokenizer_kwargs and init != "TEXT":
            raise GraphPeftError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")
        if init in SOURCE_INITS and not self.prompt_tuning_init_state_dict_path:
            raise GraphPeftError(f"prompt_tuning_init={init!r} needs prompt_tuning_init_state_dict_path, the source "
                                 f"tasks' adapter weights (--init-from FILE)")

    def for_loading(self) -> "MultitaskPromptTuningConfig":
        """Saved weights replace the init: no source checkpoint, no tokenizer."""
        return dataclasses.replace(self, prompt_tuning_init="RANDOM", tokenizer_kwargs=None)


@register_rule
class MultitaskPromptTuningRule(TokenLookupRule):
    __doc__ = __doc__
    name = "multitask_prompt_tuning"
    mergeable = False


    def rewrite(self, gm: fx.GraphModule, lookup: TokenLookup) -> Rewrite:
        cfg, name = self.config, self.adapter_name
        n, total = cfg.num_virtual_tokens, cfg.total_virtual_tokens()
        decoder, half = None, gm.meta.get(MODEL_HALF)
        if half == "decoder":          # generation's decoder graph: it has the decoder's share, if any
            if total // n != 2:
                raise NoMatchError(f"{self.name}: num_transformer_submodules=1 puts no tokens before the decoder")
            lookup, decoder = None, lookup
        elif total // n == 2 and half is None and lookup.ids is not None \
                and str(lookup.ids.target) != "decoder_input_ids":   # not Whisper's decoder, not patches
            decoder = token_lookup(gm, "decoder_input_ids")
            if decoder is None:
                raise GraphPeftError(f"{self.name}: num_transformer_submodules=2 (task_type SEQ_2_SEQ_LM) puts tokens "
                                     f"before the decoder input too, but the graph has no decoder_input_ids lookup; "
                                     f"set num_transformer_submodules=1")
        anchor = lookup or decoder
        table, cols, rows = self._initial_weights(gm, anchor, total)
        base = f"prompt_encoder.{name}"
        rw = Rewriter(gm, self.name, anchor.node, anchor.module_path, "embedding", adapter=name)
        table_attr = rw.add_parameter(f"{base}.embedding.weight", table, "prompt_embeddings")
        cols_attr = rw.add_parameter(f"{base}.prefix_task_cols", cols, "prefix_task_cols")
        rows_attr = rw.add_parameter(f"{base}.prefix_task_rows", rows, "prefix_task_rows")
        task_ids = rw.add_input("task_ids", f"{self.name} needs task_ids=LongTensor[batch] (ids 0 .. {cfg.num_tasks - 1}) "
                                            f"in every call: pass task_ids=...",
                                functools.partial(_check_task_ids, cfg.num_tasks))
        for sequence in (lookup, decoder):
            if sequence is not None:
                extend_sequence(rw, sequence, n)
        task_cols = rw.call(aten.index_select.default, rw.get_param(cols_attr), 0, task_ids)    # [B, T, r]
        task_rows = rw.call(aten.index_select.default, rw.get_param(rows_attr), 0, task_ids)    # [B, r, H]
        task_prompts = rw.call(aten.matmul.default, task_cols, task_rows)                       # [B, T, H]
        prompts = rw.call(aten.mul.Tensor, rw.get_param(table_attr), task_prompts)               # [B, T, H]
        if lookup is not None:
            first = rw.call(aten.slice.Tensor, prompts, 1, 0, n) if total != n else prompts
            replace_leading_rows(rw, lookup, first, n, batched=True)
        if decoder is not None:
            second = rw.call(aten.slice.Tensor, prompts, 1, n, 2 * n)
            replace_leading_rows(rw, decoder, second, n, batched=True)
        return rw.record(num_virtual_tokens=n, token_dim=anchor.dim, num_transformer_submodules=total // n,
                         num_tasks=cfg.num_tasks, num_ranks=cfg.num_ranks, **model_dims(gm))

    def _initial_weights(self, gm: fx.GraphModule, lookup: TokenLookup,
                         total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, C, R as PEFT draws them (in its order), then replaced from the source checkpoint if asked."""
        cfg = self.config
        init = cfg.prompt_tuning_init
        table = initial_table(gm, lookup, total, init if init in ("SAMPLE_VOCAB", "TEXT") else "RANDOM",
                              cfg.prompt_tuning_init_text, cfg.tokenizer_name_or_path, cfg.tokenizer_kwargs)
        cols = torch.normal(mean=0, std=0.02, size=(cfg.num_tasks, total, cfg.num_ranks))
        rows = torch.normal(mean=0, std=0.02, size=(cfg.num_tasks, cfg.num_ranks, lookup.dim))
        if init in SOURCE_INITS:
            source = _read_source(cfg.prompt_tuning_init_state_dict_path)
            table = _fit("prompt_embeddings", source, table)
            if init == "AVERAGE_SOURCE_TASKS":
                cols = _fit("prefix_task_cols", source, cols, lambda t: t.mean(0, keepdim=True))
                rows = _fit("prefix_task_rows", source, rows, lambda t: t.mean(0, keepdim=True))
            elif init == "EXACT_SOURCE_TASK":
                task = cfg.prompt_tuning_init_task or 0
                pick = functools.partial(_source_task, task)
                cols = _fit("prefix_task_cols", source, cols, pick)
                rows = _fit("prefix_task_rows", source, rows, pick)
        return table, cols.to(table.device), rows.to(table.device)

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        return fill_unset(data, records[0].info, _RESOLVED)


def _check_task_ids(num_tasks: int, task_ids: Any) -> Optional[str]:
    """None for task ids the prompts can be selected by, else the one-line error."""
    if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.is_floating_point() \
            or task_ids.dtype == torch.bool:
        return f"task_ids must be an integer tensor of shape [batch], got {getattr(task_ids, 'shape', task_ids)!r}"
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        bad = int(task_ids.max()) if int(task_ids.max()) >= num_tasks else int(task_ids.min())
        return f"task id {bad} is out of range: this adapter has num_tasks={num_tasks} (ids 0 .. {num_tasks - 1})"
    return None


def _read_source(path: str) -> dict[str, torch.Tensor]:
    """The source tasks' weights: safetensors, or a torch file loaded with weights_only=True (never unpickled)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise GraphPeftError(f"prompt_tuning_init_state_dict_path {path} does not exist; pass the source adapter's "
                             f"adapter_model.safetensors")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GraphPeftError(f"cannot read source weights {path} ({reason}); pass a safetensors file") from None


def _source_task(task: int, tensor: torch.Tensor) -> torch.Tensor:
    if not 0 <= task < tensor.shape[0]:
        raise GraphPeftError(f"prompt_tuning_init_task={task} but the source checkpoint has {tensor.shape[0]} tasks")
    return tensor[task].unsqueeze(0)


def _fit(key: str, source: dict, current: torch.Tensor, how=lambda t: t) -> torch.Tensor:
    if key not in source:
        raise GraphPeftError(f"the source checkpoint has no {key!r}; pass a multitask prompt tuning adapter's weights")
    value = how(source[key])
    if tuple(value.shape) != tuple(current.shape):
        raise GraphPeftError(f"source {key} gives shape {tuple(value.shape)} but this adapter needs "
                             f"{tuple(current.shape)}; match num_virtual_tokens, num_ranks and num_tasks (1 for "
                             f"AVERAGE_SOURCE_TASKS and EXACT_SOURCE_TASK)")
    return value.detach().clone().to(current.dtype)


class MultitaskPromptTuningPass(RulePass):
    """torch.fx pass: ``MultitaskPromptTuningPass(MultitaskPromptTuningConfig(...))(graph_module) -> PassResult``."""

    rule_cls = MultitaskPromptTuningRule


register_method("multitask_prompt_tuning", MultitaskPromptTuningConfig, MultitaskPromptTuningPass,
                "shared prompt x per-task low-rank matrix, chosen by task_ids (PEFT MultiTask Prompt Tuning)")
