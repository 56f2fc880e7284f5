"""AdaLoRA's config: PEFT's AdaLoraConfig fields, defaults and checks, and how its ``rank_pattern`` (the
triplets the allocator kept per site) is read.

Part of the AdaLoRA rule (passes/adalora.py re-exports it); not a rule of its own.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from graphpeft.engine.config import TargetingConfig
from graphpeft.engine.errors import GraphPeftError

RULE = "adalora"            # the rule's name: its records carry it


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class AdaLoraConfig(TargetingConfig):
    """PEFT's AdaLoraConfig fields and defaults (LoRA's targeting fields plus the budget schedule)."""

    peft_type = "ADALORA"
    unsupported_fields = ("use_dora", "lora_bias", "layer_replication", "loftq_config", "eva_config",
                          "corda_config", "trainable_token_indices", "alora_invocation_tokens",
                          "arrow_config", "kasa_config", "velora_config", "monteclora_config")

    target_r: int = field(default=8, metadata={"cli": "--target-r", "help": "average rank left after allocation"})
    init_r: int = field(default=12, metadata={"cli": "--init-r", "help": "rank of every site before allocation"})
    tinit: int = field(default=0, metadata={"cli": "--tinit", "help": "warm-up steps before pruning"})
    tfinal: int = field(default=0, metadata={"cli": "--tfinal", "help": "final steps with the ranks fixed"})
    deltaT: int = field(default=1, metadata={"cli": "--delta-t", "help": "steps between two allocations"})
    beta1: float = field(default=0.85, metadata={"cli": "--beta1", "help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"cli": "--beta2", "help": "EMA factor of the uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"cli": "--orth-reg-weight",
                                                          "help": "weight of the orthogonality loss"})
    total_step: Optional[int] = field(default=None, metadata={
        "cli": "--total-step", "help": "number of training steps, required ('train' counts them when not given)"})
    rank_pattern: Optional[dict] = None
    r: int = 8                                  # PEFT's LoRA field; not used by AdaLoRA (init_r is)
    lora_alpha: float = field(default=8, metadata={"cli": "--alpha", "help": "scaling numerator (alpha / ranknum)"})
    lora_dropout: float = field(default=0.0, metadata={"cli": "--dropout", "help": "dropout on the adapter input"})
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.total_step is None or not _is_int(self.total_step, 1):
            raise GraphPeftError(f"AdaLoRA needs total_step, the number of training steps (an integer > 0), got "
                                 f"{self.total_step!r}; set total_step (--total-step)")
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            if not _is_int(getattr(self, name), low):
                raise GraphPeftError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:
            raise GraphPeftError(f"target_r={self.target_r} is larger than init_r={self.init_r}: the allocator only "
                                 f"prunes ranks; choose target_r <= init_r")
        if self.tinit >= self.total_step - self.tfinal:
            raise GraphPeftError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                                 f"total_step={self.total_step} steps (PEFT needs tinit < total_step - tfinal); "
                                 f"decrease tinit/tfinal or increase total_step")
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise GraphPeftError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise GraphPeftError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise GraphPeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise GraphPeftError(f"bias={self.bias!r} is not supported yet; use bias='none'")
        if self.use_rslora or self.alpha_pattern:
            raise GraphPeftError("AdaLoRA scales every site by lora_alpha / ranknum; use_rslora and alpha_pattern "
                                 "have no effect (PEFT ignores them): remove them")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise GraphPeftError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise GraphPeftError("layers_pattern needs layers_to_transform too")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or any(not isinstance(v, (bool, int)) for v in mask):
                raise GraphPeftError(f"rank_pattern[{key!r}] must be a list of booleans (the kept triplets), "
                                     f"got {mask!r}")
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA and is ignored; set the initial rank with init_r", stacklevel=3)

    def for_loading(self) -> "AdaLoraConfig":
        return dataclasses.replace(self, init_lora_weights=False)    # the file's weights replace the init

    def to_dict(self) -> dict[str, Any]:
        """As PEFT saves it: rank_pattern keys without the adapter name (``<path>.lora_E``)."""
        data = super().to_dict()
        if self.rank_pattern:
            data["rank_pattern"] = {_file_key(k): [bool(v) for v in mask] for k, mask in self.rank_pattern.items()}
        return data

    @property
    def scaling(self) -> float:
        """PEFT: ``lora_alpha if lora_alpha > 0 else r``, then divided by ranknum in the forward."""
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)


def _file_key(key: str) -> str:
    """``<path>.lora_E.<adapter>`` -> ``<path>.lora_E`` (PEFT strips the adapter name when it saves)."""
    head, sep, _ = key.rpartition(".lora_E")
    return head + sep if sep else key


def rank_mask(config: AdaLoraConfig, path: str, adapter: str) -> Optional[list[bool]]:
    pattern = config.rank_pattern or {}
    for key in (f"{path}.lora_E.{adapter}", f"{path}.lora_E"):
        if key in pattern:
            return [bool(v) for v in pattern[key]]
    return None


def kept_rows(mask: Optional[list[bool]], rows: int) -> Optional[list[bool]]:
    """Row selector of a site's tensors by its rank_pattern mask; None keeps every row.

    A site rewritten at its allocated rank (loaded pruned) already holds only the kept rows.
    """
    if mask is None or rows == sum(mask):
        return None
    if rows == len(mask):
        return mask
    raise GraphPeftError(f"rank_pattern has {len(mask)} entries ({sum(mask)} kept) for a site of rank {rows}; "
                         f"the adapter does not fit its config")
