"""LoRA's config: PEFT's LoraConfig fields, defaults and checks (the subset graphpeft implements).

Part of the LoRA rule (passes/lora.py re-exports it); not a rule of its own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from graphpeft.engine.config import TargetingConfig
from graphpeft.engine.errors import GraphPeftError
from graphpeft.passes.lora_init import is_decomposing


@dataclass
class LoraConfig(TargetingConfig):
    """PEFT's LoraConfig fields and defaults (the subset graphpeft implements)."""

    peft_type = "LORA"
    unsupported_fields = ("layer_replication", "loftq_config", "eva_config",
                          "corda_config", "trainable_token_indices", "alora_invocation_tokens",
                          "arrow_config", "kasa_config", "velora_config", "monteclora_config")

    target_parameters: Optional[list[str]] = field(default=None, metadata={
        "cli": "--target-parameters", "help": "parameters used directly by ops (e.g. MoE experts), PEFT's target_parameters"})
    r: int = field(default=8, metadata={"cli": "--r", "help": "LoRA rank"})
    lora_alpha: float = field(default=8, metadata={"cli": "--alpha", "help": "scaling numerator (alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"cli": "--dropout", "help": "dropout on the LoRA input"})
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = field(default=False, metadata={"cli": "--rslora", "help": "scale by alpha / sqrt(r)"})
    init_lora_weights: Union[bool, str] = field(default=True, metadata={
        "cli": "--init", "help": "true, false, gaussian, pissa, pissa_niter_K or olora"})
    use_dora: bool = field(default=False, metadata={"cli": "--use-dora", "help": "DoRA: a trained magnitude per output feature"})
    lora_bias: bool = field(default=False, metadata={"cli": "--lora-bias", "help": "a trained bias on lora_B"})
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() in ("true", "false"):
            self.init_lora_weights = self.init_lora_weights.lower() == "true"     # from the command line
        init = self.init_lora_weights
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise GraphPeftError(f"r must be a positive integer, got {self.r!r}")
        if any(not isinstance(v, int) or v <= 0 for v in (self.rank_pattern or {}).values()):
            raise GraphPeftError(f"rank_pattern values must be positive integers, got {self.rank_pattern!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise GraphPeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise GraphPeftError(f"bias={self.bias!r} is not supported yet; use bias='none'")
        if init not in (True, False, "gaussian") and not is_decomposing(init):
            hint = " (LoftQ needs a quantized base model; use PEFT)" if init == "loftq" else ""
            raise GraphPeftError(f"init_lora_weights={init!r} is not supported{hint}; use True, False, 'gaussian', "
                                 f"'pissa', 'pissa_niter_K' or 'olora'")
        if self.lora_bias and self.use_dora:
            raise GraphPeftError("lora_bias=True cannot be combined with use_dora=True (PEFT refuses it too)")
        if self.lora_bias and init not in (True, False):
            raise GraphPeftError(f"lora_bias=True needs init_lora_weights True or False, got {init!r} (as in PEFT)")

    def for_loading(self) -> "LoraConfig":
        # PiSSA / OLoRA adapters are saved against the original weight: loading recomputes the residual, as PEFT does
        return self if is_decomposing(self.init_lora_weights) else dataclasses.replace(self, init_lora_weights=False)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """PEFT's get_pattern_key: the first pattern that matches the end of the module path wins."""
        return (_pattern_value(self.rank_pattern, module_path, self.r),
                _pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def scaling(self, module_path: str) -> float:
        r, alpha = self.rank_and_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict, key: str, default):
    for name, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({name})$", key):
            return value
    return default
