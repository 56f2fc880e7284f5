"""graphpeft: parameter-efficient fine-tuning by rewriting the model's captured graph.

    import graphpeft
    model = graphpeft.rewrite(hf_model, graphpeft.LoraConfig(r=8, target_modules="all-linear"))
    model.print_trainable_parameters()
    ... train ...
    model.save_pretrained("out")            # loads into peft.PeftModel.from_pretrained too
"""

from graphpeft.api import from_pretrained, rewrite
from graphpeft.capture import capture, set_train_mode, synthesize_inputs
from graphpeft.errors import AdapterFormatError, CaptureError, GraphPeftError, NoMatchError
from graphpeft.model import CapturedModel, GraphPeftModel
from graphpeft.meta import materialize, save_config
from graphpeft.optimize import merge_for_inference
from graphpeft.passes import AdaLoraConfig, IA3Config, LoraConfig
from graphpeft.passes import PromptTuningConfig
from graphpeft.passes import PromptEncoderConfig
from graphpeft.passes import MultitaskPromptTuningConfig
from graphpeft.passes import PrefixTuningConfig
from graphpeft.result import PassResult, Rewrite

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdapterFormatError", "CaptureError", "CapturedModel", "GraphPeftError", "GraphPeftModel", "IA3Config", "LoraConfig",
    "NoMatchError", "PassResult", "Rewrite", "capture", "from_pretrained", "rewrite", "set_train_mode",
    "synthesize_inputs", "__version__",
    "PrefixTuningConfig",
    "materialize", "merge_for_inference", "save_config",
    "PromptTuningConfig", "PromptEncoderConfig", "MultitaskPromptTuningConfig",
]
