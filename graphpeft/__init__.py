"""graphpeft: parameter-efficient fine-tuning by rewriting the model's captured graph.

    import graphpeft
    model = graphpeft.rewrite(hf_model, graphpeft.LoraConfig(r=8, target_modules="all-linear"))
    model.print_trainable_parameters()
    ... train ...
    model.save_pretrained("out")            # loads into peft.PeftModel.from_pretrained too
"""

# the rules first: importing them fills the engine's registry (they import only the engine)
from graphpeft.passes import (AdaLoraConfig, IA3Config, LoraConfig, MultitaskPromptTuningConfig, PrefixTuningConfig,
                              PromptEncoderConfig, PromptTuningConfig)

from graphpeft.engine.capture import capture, set_train_mode, synthesize_inputs
from graphpeft.engine.errors import AdapterFormatError, CaptureError, GraphPeftError, NoMatchError
from graphpeft.engine.result import PassResult, Rewrite
from graphpeft.runtime.api import from_pretrained, rewrite
from graphpeft.runtime.inference import merge_for_inference
from graphpeft.runtime.meta import materialize, save_config
from graphpeft.runtime.model import CapturedModel, GraphPeftModel

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdapterFormatError", "CaptureError", "CapturedModel", "GraphPeftError", "GraphPeftModel", "IA3Config", "LoraConfig",
    "NoMatchError", "PassResult", "Rewrite", "capture", "from_pretrained", "rewrite", "set_train_mode",
    "synthesize_inputs", "__version__",
    "PrefixTuningConfig",
    "materialize", "merge_for_inference", "save_config",
    "PromptTuningConfig", "PromptEncoderConfig", "MultitaskPromptTuningConfig",
]
