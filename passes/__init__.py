"""graphpeft's rules, one module per method. Importing this package registers them."""

from graphpeft.passes.adalora import AdaLoraConfig, AdaLoraPass, AdaLoraRule
from graphpeft.passes.ia3 import IA3Config, IA3Pass, IA3Rule
from graphpeft.passes.lora import LoraConfig, LoraPass, LoraRule
from graphpeft.passes.multitask_prompt_tuning import (MultitaskPromptTuningConfig, MultitaskPromptTuningPass,
                                                     MultitaskPromptTuningRule)
from graphpeft.passes.p_tuning import PromptEncoderConfig, PTuningPass, PTuningRule
from graphpeft.passes.prefix_tuning import PrefixTuningConfig, PrefixTuningPass, PrefixTuningRule
from graphpeft.passes.prompt_tuning import PromptTuningConfig, PromptTuningPass, PromptTuningRule

__all__ = ["AdaLoraConfig", "AdaLoraPass", "AdaLoraRule", "IA3Config", "IA3Pass", "IA3Rule", "LoraConfig", "LoraPass", "LoraRule",
           "PromptTuningConfig", "PromptTuningPass", "PromptTuningRule",
           "PromptEncoderConfig", "PTuningPass", "PTuningRule",
           "MultitaskPromptTuningConfig", "MultitaskPromptTuningPass", "MultitaskPromptTuningRule",
           "PrefixTuningConfig", "PrefixTuningPass", "PrefixTuningRule"]
