"""Config base classes, with Hugging Face PEFT's field names, and the adapter_config.json mapping.

A method's config is a dataclass that subclasses ``AdapterConfig`` (or ``TargetingConfig`` when it
selects module sites). Fields carry PEFT's names and defaults so that a PEFT adapter_config.json
reads into the same object and back. Field metadata may name a command-line flag
(``metadata={"cli": "--alpha"}``); the CLI builds a method's options from them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from graphpeft.errors import GraphPeftError


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
        self.validate()

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
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise GraphPeftError(f"{name} must be a list of module names or a regex string, got {type(value).__name__}")


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
