"""Small ONNX graph fixes for ONNX Runtime training 1.19.2 (measured here; see DESIGN.md's pitfalls).

    before                                   after                                  why
    CastLike(x, like)                        Cast(x, to=dtype(like))                no gradient for CastLike
    SequenceAt(SplitToSequence(x), i)        Slice(x, start_i, end_i)               a sequence cuts the gradient
    Softmax(s + Where(mask, 0, min)),        p * ReduceMax(mask, -1)                a row whose keys are all
      guarded by Where(IsNaN(p), 0, p)                                              masked (left padding) gives 0,
                                                                                    as in PyTorch, not a uniform mix
    ReduceL2(x)                              Sqrt(ReduceSum(x * x))                 ReduceL2's gradient is ill-typed
    Equal(a, b) on uint8 / int8 / int16      Equal(Cast(a, int64), Cast(b, int64))  no CPU kernel (torch.eye)
    LayerNormalization(x) -> y               -> (y, mean, inv_std_dev)              the gradient builder reads them
    Dropout(x, p) -> y                       -> (y, mask)                           likewise
    Dropout(x, p)            (training only) Dropout(x, p, training_mode=True)      SDPA's attention dropout comes
                                                                                    without it: off in ORT otherwise
    ir_version 11+                           10                                     ORT-training loads IR <= 10

Initializer names: torch.onnx names a weight after its path in the exported wrapper
(``model.graph_module.<attr>``); ``rename_initializers`` drops the wrapper's prefix, so every weight is
named after its graph attribute, the name the Rewrite records use. Node names are made unique, so an
error that names a node finds one, and ``module_path`` reads a node's module path from its metadata.

Every function changes an ``onnx_ir.Model`` (what torch.onnx returns) in place; the rewrites return how
many sites they changed.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

MAX_IR_VERSION = 10      # onnxruntime-training 1.19.2
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def apply_all(model: Any, training: bool = False) -> None:
    """Every fix; ``training``: the graph was exported in train mode, for ONNX Runtime training."""
    if training:
        dropout_training_mode(model)
    castlike_to_cast(model)
    sequence_splits_to_slices(model)
    masked_softmax_rows_to_zero(model)
    reduce_l2_to_sum_of_squares(model)
    small_int_comparisons_to_int64(model)
    expose_optional_outputs(model)
    remove_unused_initializers(model)
    unique_node_names(model)
    clamp_ir_version(model)


def rename_initializers(model: Any, prefix: str) -> None:
    for name, value in list(model.graph.initializers.items()):
        if name.startswith(prefix):
            value.name = name[len(prefix):]


def _replace(graph: Any, old: Any, new: Any) -> None:
    """Put ``new`` where ``old`` was: its outputs take over the old outputs' names, uses and types."""
    import onnx_ir as ir

    graph.insert_before(old, new)
    for before, after in zip(old.outputs, new.outputs):
        if before.dtype is not None:
            after.dtype = before.dtype
        if before.shape is not None:
            after.shape = before.shape
        for i, output in enumerate(graph.outputs):      # a graph output first, then the node inputs
            if output is before:
                graph.outputs[i] = after
        ir.convenience.replace_all_uses_with(before, after)
    names = [v.name for v in old.outputs]
    graph.remove(old, safe=True)
    for name, after in zip(names, new.outputs):
        after.name = name


def dropout_training_mode(model: Any) -> int:
    """Dropout with a ratio but no training_mode input gets training_mode=True; returns the count.

    (ONNX Runtime's eval model drops the input again, so evaluation runs without dropout.)
    """
    import numpy as np
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Dropout" or node.domain != "" or len(node.inputs) != 2 or node.inputs[1] is None:
            continue
        true = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(True))})
        model.graph.insert_before(node, true)
        trained = ir.Node("", "Dropout", [*node.inputs, true.outputs[0]], attributes=list(node.attributes.values()),
                          num_outputs=len(node.outputs), name=node.name, metadata_props=dict(node.metadata_props))
        _replace(model.graph, node, trained)
        count += 1
    return count


def castlike_to_cast(model: Any) -> int:
    """CastLike(x, like) -> Cast(x, to=like's dtype), wherever that dtype is known; returns the count."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "CastLike" or node.domain != "" or node.inputs[1].dtype is None:
            continue
        dtype = node.inputs[1].dtype
        cast = ir.node("Cast", [node.inputs[0]], attributes={"to": dtype}, name=node.name,
                       metadata_props=dict(node.metadata_props))
        _replace(model.graph, node, cast)
        cast.outputs[0].dtype = dtype
        count += 1
    return count


def sequence_splits_to_slices(model: Any) -> int:
    """SplitToSequence(x, split) read only by SequenceAt(i) -> one Slice per read element; returns the count.

    ``split`` is a list of sizes, or one chunk size (torch.split(x, 32)): element i is then
    x[i*size : (i+1)*size] along the axis (Slice clamps the last chunk).
    """
    import numpy as np
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "SplitToSequence" or node.domain != "" or len(node.inputs) < 2:
            continue
        split = _constant(node.inputs[1])
        users = [u for u, _ in node.outputs[0].uses()]
        if split is None or split.ndim > 1 or not users or any(u.op_type != "SequenceAt" for u in users):
            continue
        indices = [_constant(u.inputs[1]) for u in users]
        axis = node.attributes.get_int("axis", 0)
        bounds = _split_bounds(split, node.inputs[0], axis)
        if any(i is None for i in indices) or bounds is None:
            continue
        for user, index in zip(users, indices):
            start, end = bounds(int(index))
            if start is None:
                break
            consts = [ir.node("Constant", [], attributes={"value": ir.tensor(np.array([v], dtype=np.int64))})
                      for v in (start, end, axis)]
            for c in consts:
                model.graph.insert_before(user, c)
            piece = ir.node("Slice", [node.inputs[0], *(c.outputs[0] for c in consts)], name=user.name,
                            metadata_props=dict(user.metadata_props))
            _replace(model.graph, user, piece)
        if not node.outputs[0].uses():
            model.graph.remove(node, safe=True)
            count += 1
    return count


def _split_bounds(split: Any, value: Any, axis: int) -> Optional[Any]:
    """index -> (start, end) of a SplitToSequence element; (None, None) when the index cannot be resolved."""
    import numpy as np

    if split.ndim == 1:
        edges = np.concatenate([[0], np.cumsum(split)]).astype(np.int64)
        n = len(split)
        return lambda i: (int(edges[i % n]), int(edges[i % n + 1])) if -n <= i < n else (None, None)
    size = int(split)
    dim = value.shape[axis] if value.shape is not None and -len(value.shape) <= axis < len(value.shape) else None
    count = -(-dim // size) if isinstance(dim, int) else None

    def bounds(i: int) -> tuple:
        if i < 0:
            if count is None:
                return None, None
            i += count
        return i * size, (i + 1) * size
    return bounds


def masked_softmax_rows_to_zero(model: Any) -> int:
    """Attention with a boolean mask: rows whose keys are all masked output 0 (PyTorch's safe softmax).

    torch.onnx writes SDPA's boolean mask as an additive finfo.min bias and guards the softmax with
    Where(IsNaN(p), 0, p), which never fires with a finite bias: a fully masked row attends uniformly,
    where PyTorch gives zeros. Multiplying by the row's "any key visible" flag gives PyTorch's values,
    and a zero (not NaN) gradient there. Returns the number of attention sites changed.
    """
    import numpy as np
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Where" or len(node.inputs) != 3:
            continue
        isnan, probs = node.inputs[0].producer(), node.inputs[2]
        softmax = probs.producer()
        if (isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not probs or softmax is None
                or softmax.op_type != "Softmax"):
            continue
        mask = _additive_mask_source(softmax.inputs[0].producer())
        if mask is None:
            continue
        axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1], dtype=np.int64))})
        as_float = ir.node("Cast", [mask], attributes={"to": probs.dtype or ir.DataType.FLOAT})
        visible = ir.node("ReduceMax", [as_float.outputs[0], axes.outputs[0]], attributes={"keepdims": 1})
        for extra in (axes, as_float, visible):
            model.graph.insert_before(node, extra)
        zeroed = ir.node("Mul", [probs, visible.outputs[0]], name=node.name, metadata_props=dict(node.metadata_props))
        _replace(model.graph, node, zeroed)
        if not isnan.outputs[0].uses():
            model.graph.remove(isnan, safe=True)
        count += 1
    return count


def _additive_mask_source(add: Any) -> Optional[Any]:
    """The boolean mask behind ``scores + Where(mask, 0, very negative)``, else None."""
    if add is None or add.op_type != "Add":
        return None
    for operand in add.inputs:
        where = operand.producer() if operand is not None else None
        if where is None or where.op_type != "Where":
            continue
        keep, drop = _constant(where.inputs[1]), _constant(where.inputs[2])
        if keep is not None and drop is not None and keep.size == 1 and drop.size == 1 \
                and float(keep) == 0.0 and float(drop) < -1e30:
            return where.inputs[0]
    return None


def reduce_l2_to_sum_of_squares(model: Any) -> int:
    """ReduceL2(x, axes) -> Sqrt(ReduceSum(Mul(x, x), axes)), same attributes; returns the count.

    (a norm in a loss term, e.g. an orthogonality penalty: ORT 1.19.2 builds an ill-typed gradient for ReduceL2.)
    """
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "ReduceL2" or node.domain != "":
            continue
        x = node.inputs[0]
        square = ir.node("Mul", [x, x])
        total = ir.node("ReduceSum", [square.outputs[0], *node.inputs[1:]], attributes=dict(node.attributes))
        for extra in (square, total):
            model.graph.insert_before(node, extra)
        root = ir.node("Sqrt", [total.outputs[0]], name=node.name, metadata_props=dict(node.metadata_props))
        _replace(model.graph, node, root)
        count += 1
    return count


def small_int_comparisons_to_int64(model: Any) -> int:
    """Equal / Less / Greater on small integer types read int64 casts of their inputs; returns the count."""
    import onnx_ir as ir

    small = {ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.INT16, ir.DataType.UINT32}
    count = 0
    for node in list(model.graph):
        if node.op_type not in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual") or node.domain != "":
            continue
        if not any(v is not None and v.dtype in small for v in node.inputs):
            continue
        for i, value in enumerate(node.inputs):
            cast = ir.node("Cast", [value], attributes={"to": ir.DataType.INT64})
            model.graph.insert_before(node, cast)
            cast.outputs[0].dtype = ir.DataType.INT64
            node.replace_input_with(i, cast.outputs[0])
        count += 1
    return count


_OPTIONAL_OUTPUTS = {"LayerNormalization": 3, "Dropout": 2}


def expose_optional_outputs(model: Any) -> int:
    """Give LayerNormalization and Dropout all their outputs (ORT's gradient builder indexes them)."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        wanted = _OPTIONAL_OUTPUTS.get(node.op_type) if node.domain == "" else None
        if wanted is None or len(node.outputs) >= wanted:
            continue
        full = ir.Node("", node.op_type, list(node.inputs), attributes=list(node.attributes.values()),
                       num_outputs=wanted, name=node.name, metadata_props=dict(node.metadata_props))
        extra = full.outputs[len(node.outputs):]
        _replace(model.graph, node, full)
        for i, value in enumerate(extra):
            value.name = f"{full.name}_optional_output_{i}"
        count += 1
    return count


def unique_node_names(model: Any) -> None:
    """Inlined functions repeat node names (``n0``); an error that names a node must find one node."""
    seen: set[str] = set()
    for node in model.graph:
        name = node.name or node.op_type
        if name in seen:
            i = 1
            while f"{name}_{i}" in seen:
                i += 1
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def remove_unused_initializers(model: Any) -> None:
    """Constants left without a reader by the rewrites above (ORT warns about each one)."""
    outputs = {id(v) for v in model.graph.outputs}
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and id(value) not in outputs:
            del model.graph.initializers[name]


def _constant(value: Any) -> Optional[Any]:
    """The numpy value of a constant input (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def clamp_ir_version(model: Any) -> None:
    """ORT-training 1.19.2 refuses IR versions above 10; the graphs here use nothing newer."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def module_path(metadata: dict[str, str]) -> Optional[str]:
    """The module path of the op an ONNX node came from (torch.onnx's name scopes), or None."""
    scopes = metadata.get(NAME_SCOPES)
    if not scopes:
        return None
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    paths = [p for p in parts[:-1] if p]       # the last scope is the op itself
    return paths[-1] if paths else ""
