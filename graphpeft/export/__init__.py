"""Edge fine-tuning: the rewritten graph as ONNX, and ONNX Runtime training artifacts for its adapter.

    from graphpeft.export import export_onnx, export_training, EdgeTrainer

    export_onnx(peft_model, "model.onnx")                 # inference, adapters merged (merged=False: kept)
    export_training(peft_model, "artifacts")              # only the adapter parameters are trainable
    trainer = EdgeTrainer("artifacts")                     # ONNX Runtime training API
    trainer.train(batches, epochs=3, lr=1e-3)
    trainer.save_adapter("adapter")                        # PEFT's format

    graph.py     positional wrapper and torch.onnx (dynamo) export of the rewritten graph
    fixes.py     ONNX fixes that ONNX Runtime training needs (CastLike, sequence splits, IR version)
    inputs.py    example inputs and the task, read off the captured graph
    form.py      the form an adapter is exported in (a method's export_form hook: e.g. AdaLoRA as plain LoRA)
    onnx.py      inference export
    training.py  training artifacts (generate_artifacts) and edge.json
    edge.py      the on-device trainer
    extra.py     the optional extra 'onnx' (onnx, onnxscript, onnxruntime-training)

Nothing here names a PEFT method: the trainable parameters, their saved keys and whether an adapter
can be merged come from the Rewrite records and the registry.
"""

from graphpeft.export.edge import EdgeHistory, EdgeTrainer, read_manifest
from graphpeft.export.extra import MissingExtraError, require
from graphpeft.export.form import ExportForm, export_form
from graphpeft.export.onnx import OnnxExport, export_onnx
from graphpeft.export.training import NoGradientError, TrainingExport, adapter_parameters, export_training

__all__ = ["EdgeHistory", "EdgeTrainer", "ExportForm", "MissingExtraError", "NoGradientError", "OnnxExport",
           "TrainingExport", "adapter_parameters", "export_form", "export_onnx", "export_training", "read_manifest",
           "require"]
