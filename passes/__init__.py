"""graphpeft's rules, one module per method. Importing this package registers them."""

from graphpeft.passes.lora import LoraConfig, LoraPass, LoraRule

__all__ = ["LoraConfig", "LoraPass", "LoraRule"]
