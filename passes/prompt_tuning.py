"""Prompt Tuning: learned virtual-token embeddings in front of the input sequence, with Hugging Face
PEFT's semantics (peft.tuners.prompt_tuning, PeftModel*.forward).

Maths: with ids x [B, L], mask m [B, L], E the model's token-embedding module and P [V, H] the
learned prompt table (V = num_virtual_tokens),

    h = E(x)  [B, L, H]      ->   h = [P ; E(x)]  [B, V+L, H]     (P the same for every row)
    m                        ->   [1_V ; m],   token_type_ids t -> [0_V ; t]

and the model runs on V+L positions (positions 0 .. V+L-1, the causal mask over V+L), so a causal
LM's logits have V+L positions; its labels are padded with V times -100 in front (outside the graph).

The site is the token-embedding lookup of ``input_ids`` (the output of the embedding module, so
BART's scale inside it applies to the real tokens only). For encoder-decoders only the encoder
sequence gets the prompt. See ``graphpeft.engine.virtual_tokens``:

before:                                    after:
    input_ids ─ embedding(W) ─ h ─ ...         input_ids ─ cat(0…) ─ embedding(W) ─ h ─ slice(V:) ─┐
    attention_mask ─────────── ...             P ─ type_as ─ expand(B) ─────────────────────────── cat ─ ...
                                               attention_mask ─ cat(1…) ─ ...

The table lives at ``prompt_encoder.<adapter>.embedding.weight`` (PEFT's in-memory name), with
V x num_transformer_submodules rows (2 for SEQ_2_SEQ_LM, of which the encoder uses the first V),
and is saved as ``prompt_embeddings``. Inits: RANDOM (normal), SAMPLE_VOCAB (rows of random
vocabulary ids), TEXT (rows of the tokenized ``prompt_tuning_init_text``, cut or repeated to fit).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.config import PromptLearningConfig
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter
from graphpeft.engine.rule import RulePass
from graphpeft.engine.virtual_tokens import (TokenLookup, TokenLookupRule, extend_sequence, fill_unset, initial_table,
                                      model_dims, replace_leading_rows)

aten = torch.ops.aten
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
_RESOLVED = ("token_dim", "num_transformer_submodules", "num_layers", "num_attention_heads")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's PromptTuningConfig fields and defaults."""

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = field(default="RANDOM", metadata={
        "cli": "--init", "help": "initial prompt: RANDOM, SAMPLE_VOCAB (random vocabulary rows) or TEXT"})
    prompt_tuning_init_text: Optional[str] = field(default=None, metadata={
        "cli": "--init-text", "help": "the text whose token embeddings start the prompt (with --init TEXT)"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={
        "cli": "--tokenizer", "help": "the model's tokenizer, a folder or cached hub id (with --init TEXT)"})
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.prompt_tuning_init, enum.Enum):        # peft.PromptTuningInit members too
            self.prompt_tuning_init = self.prompt_tuning_init.value
        init = self.prompt_tuning_init
        if init not in INITS:
            raise GraphPeftError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {init!r}")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise GraphPeftError("prompt_tuning_init='TEXT' needs the model's tokenizer: set tokenizer_name_or_path "
                                 "(--tokenizer PATH), a local folder or a cached hub id")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise GraphPeftError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (--init-text '...')")
        if self.tokenizer_kwargs and init != "TEXT":
            raise GraphPeftError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")

    def for_loading(self) -> "PromptTuningConfig":
        """Saved weights replace the init: no vocabulary sampling, no tokenizer."""
        return dataclasses.replace(self, prompt_tuning_init="RANDOM", tokenizer_kwargs=None)


@register_rule
class PromptTuningRule(TokenLookupRule):
    __doc__ = __doc__
    name = "prompt_tuning"
    mergeable = False


    def rewrite(self, gm: fx.GraphModule, lookup: TokenLookup) -> Rewrite:
        cfg, name = self.config, self.adapter_name
        n, total = cfg.num_virtual_tokens, cfg.total_virtual_tokens()
        rw = Rewriter(gm, self.name, lookup.node, lookup.module_path, "embedding", adapter=name)
        table = initial_table(gm, lookup, total, cfg.prompt_tuning_init, cfg.prompt_tuning_init_text,
                              cfg.tokenizer_name_or_path, cfg.tokenizer_kwargs)
        attr = rw.add_parameter(f"prompt_encoder.{name}.embedding.weight", table, "prompt_embeddings")
        extend_sequence(rw, lookup, n)
        prompts = rw.get_param(attr)
        if total != n:
            prompts = rw.call(aten.slice.Tensor, prompts, 0, 0, n)     # the encoder's share
        replace_leading_rows(rw, lookup, prompts, n)
        return rw.record(num_virtual_tokens=n, token_dim=lookup.dim, num_transformer_submodules=total // n,
                         **model_dims(gm))

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        return fill_unset(data, records[0].info, _RESOLVED)


class PromptTuningPass(RulePass):
    """torch.fx pass: ``PromptTuningPass(PromptTuningConfig(num_virtual_tokens=8))(graph_module) -> PassResult``."""

    rule_cls = PromptTuningRule


register_method("prompt_tuning", PromptTuningConfig, PromptTuningPass,
                "learned virtual tokens before the input (PEFT Prompt Tuning)")
