"""Config base classes, with Hugging Face PEFT's field names, and the adapter_config.json mapping.

A method's config is a dataclass that subclasses ``AdapterConfig`` (or ``TargetingConfig`` when it
selects module sites). Fields carry PEFT's names and defaults so that a PEFT adapter_config.json
reads into the same object and back. Field metadata may name a command-line flag
(``metadata={"cli": "--alpha"}``); the CLI builds a method's options from them.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from graphpeft.engine.errors import GraphPeftError


# PEFT's TaskType values
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def check_field_types(config: Any) -> None:
    """A one-line GraphPeftError for a field whose value does not fit its annotation.

    Understood annotations: bool, int, float (an int is accepted), str, dict, list[X], Optional and
    Union of those; other annotations are not checked. A str-valued enum member passes as a str.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        expected = _describe(hints.get(f.name))
        value = getattr(config, f.name)
        if expected is not None and not _fits(value, hints[f.name]):
            raise GraphPeftError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict) or value is None    # PEFT writes null for an empty pattern
    if origin is list:
        is_list = isinstance(value, (list, tuple, set, frozenset))    # PEFT takes any collection
        return is_list and (not args or all(_fits(v, args[0]) for v in value))
    return True


def _describe(hint: Any) -> Optional[str]:
    """Words for an understood annotation ("a number", "a list of strings or a string or None"); None if not understood."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        parts = [_describe(a) for a in args]
        if None in parts:
            return None
        # typing caches equal unions, so the order of args depends on which spelling came first: sort
        return " or ".join(sorted(dict.fromkeys(parts), key=lambda p: (p == "None", p)))
    words = {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string",
             dict: "a dict"}
    if hint in words:
        return words[hint]
    if origin is dict:
        return "a dict"
    plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    if origin is list and args and args[0] in plural:
        return f"a list of {plural[args[0]]}"
    return None


@dataclass
class AdapterConfig:
    """Fields every method shares (PEFT's ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):  # accept peft.TaskType members too
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise GraphPeftError(f"task_type must be one of {', '.join(TASK_TYPES)} (as in PEFT) or None, "
                                 f"got {self.task_type!r}")
        try:
            self.validate()          # the method's own checks speak first ...
        except GraphPeftError:
            raise
        except (TypeError, ValueError, AttributeError):
            check_field_types(self)  # ... a crash in them on a wrongly typed field becomes one line
            raise
        check_field_types(self)      # ... and every field must fit its annotation

    def validate(self) -> None:
        """Raise GraphPeftError for a field value PEFT would refuse."""

    def for_loading(self) -> "AdapterConfig":
        """The config to rewrite with before loading saved weights: a method whose initialisation is
        costly or needs outside input (a tokenizer) returns a copy that skips it."""
        return self

    # -- adapter_config.json ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a PEFT adapter_config.json dict; PEFT fields graphpeft does not use are dropped."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type and cls.peft_type and str(peft_type).upper() != cls.peft_type:
            raise GraphPeftError(f"adapter_config.json has peft_type {peft_type!r}, expected {cls.peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        blocking = {k: v for k, v in data.items()
                    if k in getattr(cls, "unsupported_fields", ()) and v not in (None, False, {}, [], "")}
        if blocking:
            k, v = next(iter(blocking.items()))
            raise GraphPeftError(f"adapter_config.json sets {k}={v!r}, which graphpeft does not support yet; remove it or use PEFT")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise GraphPeftError(f"adapter_config.json does not fit {cls.__name__}: {exc}") from None


@dataclass
class TargetingConfig(AdapterConfig):
    """Fields of methods that select module sites (PEFT's tuner configs): target_modules semantics.

    target_modules      list: a module path matches exactly or by suffix ``.name``;
                        str: full regex match; "all-linear": every linear site but the output head
    exclude_modules     same forms, removes matches
    target_parameters   parameter names (exact or suffix), PEFT's ``target_parameters``
    layers_to_transform / layers_pattern   keep only sites in these layer indices
    modules_to_save     modules trained in full and saved with the adapter
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"cli": "--targets"})
    exclude_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "target_parameters", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise GraphPeftError(f"{name} must be a list of module names or a regex string, got {type(value).__name__}")
        super().__post_init__()


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields of the methods that add virtual tokens (PEFT's ``PromptLearningConfig``).

    num_virtual_tokens          how many positions the adapter puts in front of the sequence (required)
    token_dim                   the token embedding size; None: read from the graph's embedding lookup
    num_transformer_submodules  1, or 2 for encoder-decoders (PEFT's default with task_type SEQ_2_SEQ_LM)
    num_attention_heads, num_layers   written to adapter_config.json as PEFT does; None: from the model
    modules_to_save             modules trained in full and saved with the adapter

    The model itself is left unwrapped by these methods in PEFT, so whole modules are saved under
    ``base_model.<module path>`` (no ``.model.``): ``saved_key_prefix``.
    """

    saved_key_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: Optional[int] = field(default=None, metadata={
        "cli": "--num-virtual-tokens", "help": "virtual tokens put in front of the input sequence"})
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise GraphPeftError(f"num_virtual_tokens must be a positive integer, got {n!r} "
                                 f"(--num-virtual-tokens N on the command line)")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise GraphPeftError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")
        if self.token_dim is not None and (not isinstance(self.token_dim, int) or self.token_dim <= 0):
            raise GraphPeftError(f"token_dim must be a positive integer or None, got {self.token_dim!r}")

    def total_virtual_tokens(self) -> int:
        """Rows of the prompt table: num_virtual_tokens per transformer submodule (PEFT's default count)."""
        return self.num_virtual_tokens * self.transformer_submodules()

    def transformer_submodules(self) -> int:
        if self.num_transformer_submodules is not None:
            return self.num_transformer_submodules
        return 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
