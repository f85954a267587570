"""ONNX graphs that keep session states on the execution device: a model wrapped with the gather
of its batch's states from the pool and the scatter of the new ones back, and the small gather
and scatter graphs for single slots (reset, read, write)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rnnstream.server.core._models import ModelSpec, StateSpec

__all__ = [
    "NEW_PREFIX",
    "OLD_PREFIX",
    "POOL_NEXT_PREFIX",
    "POOL_PREFIX",
    "SLOTS",
    "gather_graph",
    "scatter_graph",
    "step_graph",
]

POOL_PREFIX = "rnnstream_pool_"  # + state number: the pool in, slots first
POOL_NEXT_PREFIX = "rnnstream_pool_next_"  # the pool after the step
OLD_PREFIX = "rnnstream_old_"  # the batch's states before the step, batch first
NEW_PREFIX = "rnnstream_new_"  # ... and after it
SLOTS = "rnnstream_slots"  # int64 [B]: the pool slot of each batch row
_MIN_OPSET = 13  # Unsqueeze takes its axes as an input from 13 on


def _perm_to(axis: int, rank: int) -> list[int]:
    """Transpose's perm that moves axis 0 to `axis` (the rest in order)."""
    order = list(range(1, rank))
    order.insert(axis, 0)
    return order


def _perm_from(axis: int, rank: int) -> list[int]:
    """Transpose's perm that moves `axis` to 0."""
    return [axis, *(i for i in range(rank) if i != axis)]


def _onnx_dtype(dtype: np.dtype[Any]) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(dtype))


def step_graph(model_bytes: bytes, spec: ModelSpec) -> bytes:
    """The model with each state input fed by Gather(pool, slots) and each state output
    scattered back into the pool (ScatterND into a new pool: ORT runs it into the other of two
    buffers). Outputs besides the model's: the pool after the step, and the batch's states
    before and after it (fetched only when the state store needs them). Raises ValueError for a
    graph it cannot wrap (an opset before 13)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < _MIN_OPSET:
        raise ValueError(f"opset {opset} (states on the device need opset {_MIN_OPSET} or later)")
    graph = model.graph
    state_inputs = {s.input_name for s in spec.states}
    kept = [i for i in graph.input if i.name not in state_inputs]
    del graph.input[:]
    graph.input.extend(kept)
    graph.input.append(helper.make_tensor_value_info(SLOTS, onnx.TensorProto.INT64, ["batch"]))
    front: list[Any] = [
        helper.make_node(
            "Unsqueeze",
            [SLOTS, "rnnstream_axis_1"],
            ["rnnstream_slots_2d"],
            name="rnnstream_slots_2d",
        )
    ]
    back: list[Any] = []
    graph.initializer.append(
        helper.make_tensor("rnnstream_axis_1", onnx.TensorProto.INT64, [1], [1])
    )
    for number, state in enumerate(spec.states):
        rank = len(state.shape)
        elem = _onnx_dtype(state.dtype)
        rest = ["slots", *(f"d{i}" for i in range(rank - 1))]
        graph.input.append(helper.make_tensor_value_info(f"{POOL_PREFIX}{number}", elem, rest))
        old, new = f"{OLD_PREFIX}{number}", f"{NEW_PREFIX}{number}"
        front.append(
            helper.make_node(
                "Gather", [f"{POOL_PREFIX}{number}", SLOTS], [old], axis=0, name=f"{old}_gather"
            )
        )
        front.append(
            helper.make_node(
                "Transpose",
                [old],
                [state.input_name],
                perm=_perm_to(state.batch_axis, rank),
                name=f"{old}_to_model",
            )
        )
        back.append(
            helper.make_node(
                "Transpose",
                [state.output_name],
                [new],
                perm=_perm_from(state.batch_axis, rank),
                name=f"{new}_from_model",
            )
        )
        back.append(
            helper.make_node(
                "ScatterND",
                [f"{POOL_PREFIX}{number}", "rnnstream_slots_2d", new],
                [f"{POOL_NEXT_PREFIX}{number}"],
                name=f"{new}_scatter",
            )
        )
        dims = rest[1:]
        graph.output.append(
            helper.make_tensor_value_info(f"{POOL_NEXT_PREFIX}{number}", elem, ["slots", *dims])
        )
        for name in (old, new):
            graph.output.append(helper.make_tensor_value_info(name, elem, ["batch", *dims]))
    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _small_graph(nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "rnnstream_states", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def scatter_graph(state: StateSpec) -> bytes:
    """pool_next = ScatterND(pool, index [N, 1], values [N, ...]): writes whole slots."""
    import onnx
    from onnx import helper

    elem = _onnx_dtype(state.dtype)
    dims = [f"d{i}" for i in range(len(state.shape) - 1)]
    return _small_graph(
        [helper.make_node("ScatterND", ["pool", "index", "values"], ["pool_next"])],
        [
            helper.make_tensor_value_info("pool", elem, ["slots", *dims]),
            helper.make_tensor_value_info("index", onnx.TensorProto.INT64, ["n", 1]),
            helper.make_tensor_value_info("values", elem, ["n", *dims]),
        ],
        [helper.make_tensor_value_info("pool_next", elem, ["slots", *dims])],
    )


def gather_graph(state: StateSpec) -> bytes:
    """values [N, ...] = Gather(pool, index [N], axis 0): reads whole slots."""
    import onnx
    from onnx import helper

    elem = _onnx_dtype(state.dtype)
    dims = [f"d{i}" for i in range(len(state.shape) - 1)]
    return _small_graph(
        [helper.make_node("Gather", ["pool", "index"], ["values"], axis=0)],
        [
            helper.make_tensor_value_info("pool", elem, ["slots", *dims]),
            helper.make_tensor_value_info("index", onnx.TensorProto.INT64, ["n"]),
        ],
        [helper.make_tensor_value_info("values", elem, ["n", *dims])],
    )
