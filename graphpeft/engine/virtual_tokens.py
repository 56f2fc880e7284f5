"""Virtual tokens: learned vectors that take the first positions of a token sequence.

The token-embedding lookup of a sequence input is the site; the graph is made to see ``n`` more
positions from its entry on, and the lookup's first ``n`` rows are then replaced by the adapter's
vectors. That is what Hugging Face PEFT does from outside the model, calling it with
``inputs_embeds = cat(prompts, word_embeddings(input_ids))``, ``attention_mask = cat(ones, mask)``
and ``token_type_ids = cat(zeros, token_type_ids)``, positions 0 .. n+L-1:

    before:  input_ids ────────────── embedding(W) [─ scale] ─ h [B, L, H] ─ (the model)
             attention_mask ──────────────────────────────────────────────── (the model)

    after:   input_ids ─ cat([0]*n, ·) ─ embedding(W) [─ scale] ─ h [B, n+L, H]
             prompts [n, H] ─ type_as ─ expand(B) ─┬─ cat(·, h[:, n:], dim=1) ─ (the model)
             attention_mask ─ cat([1]*n, ·) ─────────────────────────────────── (the model)

"The lookup" is the output of the embedding module, so a scale inside it (BART's
BartScaledWordEmbedding) applies to the real tokens and not to the prompts, as in PEFT. Every shape,
causal mask and position the model derives from its inputs then covers n+L positions. Only the
sequence of the given input moves: for an encoder-decoder, the encoder's (``input_ids``) or the
decoder's (``decoder_input_ids``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.engine.frame_sequence import FrameSequence, frame_sequence, insert_frames
from graphpeft.engine.match import Site, find_sites, is_stamped, module_stack_entry
from graphpeft.engine.patch_sequence import PatchSequence, insert_after_leading, patch_sequence
from graphpeft.engine.rewriter import MODEL_HALF, Rewriter, get_attr_path
from graphpeft.engine.rule import Rule
from graphpeft.engine.sequence import placeholder, prepend_positions, sequence_inputs

aten = torch.ops.aten
_INT_MAX = 9223372036854775807
# ops between a placeholder and the embedding that only reshape or cast the ids (GPT-2 views them)
_ID_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
             aten.clone.default, aten.alias.default, aten._to_copy.default, aten.to.dtype}


@dataclass(frozen=True)
class TokenLookup:
    """The embedding lookup of one sequence input."""

    site: Site            # the embedding op (its weight, vocabulary size, embedding size)
    ids: fx.Node          # the placeholder whose token ids it looks up
    output: fx.Node       # the embedding module's output (the lookup, after e.g. a scale inside the module)

    @property
    def node(self) -> fx.Node:
        return self.site.node

    @property
    def module_path(self) -> str:
        return self.site.module_path

    @property
    def dim(self) -> int:
        return self.site.out_features

    @property
    def vocab_size(self) -> int:
        return self.site.in_features


def token_lookup(gm: fx.GraphModule, main: str = "input_ids") -> Optional[TokenLookup]:
    """The embedding lookup that reads the token ids of graph input ``main``, or None.

    When the graph has no input of that name, a single non-decoder placeholder that feeds an
    embedding is taken for it (a custom model whose ids input is called otherwise).
    """
    lookups = []
    for site in find_sites(gm):
        if site.kind != "embedding":
            continue
        source = _ids_source(site.node)
        if source is not None:
            lookups.append((source, site))
    wanted = placeholder(gm, main)
    if wanted is None and main == "input_ids":
        sources = {s for s, _ in lookups if not str(s.target).startswith("decoder_")}
        wanted = next(iter(sources)) if len(sources) == 1 else None
    site = next((site for source, site in lookups if source is wanted), None)
    if site is None:
        return None
    return TokenLookup(site, wanted, _module_output(site.node, site.module_path))


def prompt_lookup(gm: fx.GraphModule) -> Optional[TokenLookup | PatchSequence | FrameSequence]:
    """Where virtual tokens go: the lookup of ``input_ids``; else (a model whose encoder reads no tokens,
    e.g. Whisper's ``input_features``) the lookup of ``decoder_input_ids``; else (a vision transformer) the
    patch-embedding sequence, after its class token; else (a raw-audio encoder: wav2vec2, HuBERT) the frame
    sequence entering its first transformer layer (``graphpeft.engine.frame_sequence``); else None. The encoder graph of an encoder-decoder
    (generation captures it apart, graph meta ``MODEL_HALF``) has its ``input_ids`` lookup or nothing."""
    if gm.meta.get(MODEL_HALF) == "encoder":
        return token_lookup(gm, "input_ids")
    return (token_lookup(gm, "input_ids") or token_lookup(gm, "decoder_input_ids") or patch_sequence(gm)
            or frame_sequence(gm))


class TokenLookupRule(Rule):
    """Base of the rules anchored on the token-embedding lookup of ``input_ids``: the pattern and the
    check they share (the site; a ``token_dim`` in the config must be the embedding's size)."""

    def sites(self, gm: fx.GraphModule) -> list[TokenLookup]:
        lookup = prompt_lookup(gm)
        if lookup is None:
            raise NoMatchError(f"{self.name}: the graph has no embedding lookup of input_ids or decoder_input_ids "
                               f"no patch embedding and no audio frames; it needs a model that embeds token ids (a "
                               f"text model, a speech model's decoder), image patches (a vision transformer) or "
                               f"raw audio before transformer layers (wav2vec2, HuBERT)")
        return [lookup]

    def check(self, lookup: TokenLookup) -> Optional[str]:
        dim = getattr(self.config, "token_dim", None)
        if dim is not None and dim != lookup.dim:
            return f"token_dim={dim} but the embedding {lookup.module_path} has size {lookup.dim}; leave token_dim unset"
        return None


def lookup_rows(gm: fx.GraphModule, lookup: TokenLookup, ids: torch.Tensor) -> torch.Tensor:
    """What the embedding module returns for ``ids`` ([n] -> [n, dim]): PEFT's ``word_embeddings(ids)``.

    The ops inside the module after the lookup (a scale) are evaluated too.
    """
    weight = get_attr_path(gm, lookup.site.weight_name)
    with torch.no_grad():
        value = F.embedding(ids.to(weight.device), weight)
        node = lookup.site.node
        while node is not lookup.output:
            user = next(iter(node.users))
            args = fx.node.map_arg((user.args, user.kwargs), lambda a: _constant(gm, a, node, value))
            value, node = user.target(*args[0], **args[1]), user
    return value.detach().clone()


def extend_sequence(rw: Rewriter, lookup: TokenLookup, n: int) -> None:
    """Prepend ``n`` positions to every input on the sequence axis of ``lookup``'s ids (stamped through ``rw``).

    Ids get a non-pad id (their lookup rows are replaced; a model that numbers positions from its ids, as
    Speech2Text and RoBERTa do, then counts the prompts, as PEFT's inputs_embeds path does), masks 1, token
    type ids 0, labels -100. A patch sequence has
    no such inputs (its length is the graph's own, see ``replace_leading_rows``).
    """
    if isinstance(lookup, (PatchSequence, FrameSequence)):
        return
    gm = rw.gm
    inputs = sequence_inputs(gm, str(lookup.ids.target))
    for node in inputs:
        if str(node.target).endswith("position_ids"):
            raise GraphPeftError(f"the graph was captured with {node.target} as an input; virtual tokens need the "
                                 f"model's own positions (PEFT ignores position_ids too): capture without it")
    for node in inputs:
        name = str(node.target)
        fill = 1 if "mask" in name else (-100 if name.endswith("labels") else 0)
        if node is lookup.ids:
            fill = _filler_id(gm)
        _, inserted = prepend_positions(gm, node, n, fill)
        rw.adopt(inserted)


def replace_leading_rows(rw: Rewriter, lookup: TokenLookup, prompts: fx.Node, n: int, batched: bool = False) -> fx.Node:
    """Every reader of the lookup reads ``cat([prompts, lookup[:, n:]], dim=1)``; returns the cat node.

    ``prompts`` is [n, dim], the same for every row of the batch, or [B, n, dim] when ``batched``; it
    is cast to the lookup's dtype, as PEFT casts the prompts to that of inputs_embeds. In a patch sequence
    the prompts go after the class token instead (``graphpeft.engine.patch_sequence``); in an audio encoder's frame
    sequence, in front of the frames that enter the first layer (``graphpeft.engine.frame_sequence``).
    """
    if isinstance(lookup, PatchSequence):
        return insert_after_leading(rw, lookup, prompts, n, batched)
    if isinstance(lookup, FrameSequence):
        return insert_frames(rw, lookup, prompts, n, batched)
    out = lookup.output
    if _comes_after(out, rw._cursor):      # insert after the lookup, and after what the caller inserted
        rw.start_before(out.next)
    prompts = rw.call(aten.type_as.default, prompts, out)
    if not batched:
        batch = rw.call(aten.sym_size.int, out, 0)
        prompts = rw.call(aten.unsqueeze.default, prompts, 0)
        prompts = rw.call(aten.expand.default, prompts, [batch, -1, -1])
    rest = rw.call(aten.slice.Tensor, out, 1, n, _INT_MAX)
    joined = rw.call(aten.cat.default, [prompts, rest], 1)
    rw.replace_uses(out, joined)
    return joined


def initial_table(gm: fx.GraphModule, lookup: TokenLookup, total: int, init: str = "RANDOM",
                  text: Optional[str] = None, tokenizer_name_or_path: Optional[str] = None,
                  tokenizer_kwargs: Optional[dict] = None) -> torch.Tensor:
    """PEFT's PromptEmbedding init of a [total, dim] float32 table.

    RANDOM        nn.Embedding's init, normal(0, 1)
    SAMPLE_VOCAB  the lookup of ``total`` token ids drawn uniformly from the vocabulary
    TEXT          the lookup of the text's token ids, cut or repeated to ``total``
    """
    table = torch.nn.Embedding(total, lookup.dim).weight.detach()      # drawn first, as PEFT does
    if isinstance(lookup, (PatchSequence, FrameSequence)) and init in ("SAMPLE_VOCAB", "TEXT"):
        what = "patch sequence" if isinstance(lookup, PatchSequence) else "audio frames"
        raise GraphPeftError(f"prompt_tuning_init={init!r} needs a token vocabulary, but the prompts go into the "
                             f"{what} of {lookup.module_path} (a model without one); use RANDOM")
    device = get_attr_path(gm, lookup.site.weight_name).device
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, lookup.vocab_size, (total,), dtype=torch.long)
    elif init == "TEXT":
        ids = torch.tensor(text_token_ids(tokenizer_name_or_path, text, total, tokenizer_kwargs), dtype=torch.long)
        if int(ids.max()) >= lookup.vocab_size:
            raise GraphPeftError(f"the tokenizer {tokenizer_name_or_path!r} gives token id {int(ids.max())}, beyond the "
                                 f"model's vocabulary of {lookup.vocab_size}; use the model's own tokenizer")
    else:
        return table.to(device)
    return lookup_rows(gm, lookup, ids).to(torch.float32)


def text_token_ids(tokenizer_name_or_path: Optional[str], text: Optional[str], n: int,
                   tokenizer_kwargs: Optional[dict] = None) -> list[int]:
    """PEFT's TEXT init: the text's token ids, cut or repeated to ``n``. The tokenizer is read offline
    when HF_HUB_OFFLINE is set; it never runs remote code."""
    from graphpeft.engine.hf_hub import offline

    if not tokenizer_name_or_path:
        raise GraphPeftError("prompt_tuning_init='TEXT' needs the model's tokenizer: set tokenizer_name_or_path "
                             "(a local model folder or a cached hub id)")
    if text is None or not str(text).strip():
        raise GraphPeftError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
    kwargs = {k: v for k, v in (tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, local_files_only=offline(), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GraphPeftError(f"cannot load the tokenizer {tokenizer_name_or_path!r} for prompt_tuning_init='TEXT' "
                             f"({reason}); pass a local folder with tokenizer files") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise GraphPeftError(f"prompt_tuning_init_text {text!r} gives no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def fill_unset(data: dict[str, Any], info: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """adapter_config.json ``data`` with the fields in ``names`` that are None taken from a record's ``info``
    (the sizes a pass read off the graph), so PEFT finds them without guessing from the model config."""
    return {**data, **{n: info[n] for n in names if data.get(n) is None and info.get(n) is not None}}


def model_dims(gm: fx.GraphModule) -> dict[str, Optional[int]]:
    """num_layers and num_attention_heads of a Hugging Face model, as PEFT writes them to the config.

    PEFT reads them under a few config names; distilbert's (n_layers, n_heads) are read too.
    """
    from graphpeft.engine.capture import capture_info

    info = capture_info(gm)
    config = getattr(info, "hf_config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> Optional[int]:
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    return {"num_layers": first("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
            "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                                         "n_heads")}


# -- helpers ----------------------------------------------------------------------------------------

def _filler_id(gm: fx.GraphModule) -> int:
    """0, or 1 where 0 is the model's pad id."""
    from graphpeft.engine.capture import capture_info

    config = getattr(capture_info(gm), "hf_config", None)
    pads = {getattr(c, "pad_token_id", None) for c in (config, getattr(config, "get_text_config", lambda: None)())
            if c is not None}
    return 1 if 0 in pads else 0


def _ids_source(node: fx.Node) -> Optional[fx.Node]:
    """The placeholder whose ids an embedding op looks up, through views and our own prepended cat."""
    ids = node.args[1] if node.target is aten.embedding.default else (node.args[0] if node.args else None)
    for _ in range(16):
        if not isinstance(ids, fx.Node):
            return None
        if ids.op == "placeholder":
            return ids
        if ids.target in _ID_VIEWS:
            ids = ids.args[0]
        elif ids.target is aten.cat.default and is_stamped(ids):   # positions a pass prepended
            ids = ids.args[0][-1]
        else:
            return None
    return None


def _module_output(node: fx.Node, path: str) -> fx.Node:
    """Follow the single-user chain of ops that stay in the embedding's own module (e.g. a scale)."""
    out = node
    while len(out.users) == 1:
        user = next(iter(out.users))
        if user.op != "call_function" or is_stamped(user) or module_stack_entry(user)[0] != path:
            break
        if any(isinstance(a, fx.Node) and a is not out and a.op != "get_attr" for a in user.all_input_nodes):
            break
        out = user
    return out


def _comes_after(node: fx.Node, other: fx.Node) -> bool:
    """True when ``node`` is later than ``other`` in the graph's order."""
    cur = other.next
    while cur.op != "root":
        if cur is node:
            return True
        cur = cur.next
    return False


def _constant(gm: fx.GraphModule, arg: fx.Node, current: fx.Node, value: torch.Tensor) -> Any:
    if arg is current:
        return value
    return get_attr_path(gm, str(arg.target))

