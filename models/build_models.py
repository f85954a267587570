"""Build the reproducible recurrent ONNX models shipped here: rnn_tanh, rnn_relu, gru, lstm."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; onnxruntime 1.20+ loads it
PRODUCER = "rnnstream"
MODEL_FILE = "model.onnx"

# Gate count per op: the row blocks stacked in W/R (RNN: i; GRU: z, r, h; LSTM: i, o, f, c).
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


@dataclass(frozen=True)
class ModelSpec:
    """How one model is built: op type, sizes, seed and op attributes."""

    name: str
    op_type: str
    input_size: int
    hidden_size: int
    seed: int
    description: str
    activations: tuple[str, ...] | None = None
    linear_before_reset: int | None = None
    # If set, R is rescaled so that its spectral norm (largest singular value) is this value.
    recurrent_norm: float | None = None


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="rnn_tanh",
        op_type="RNN",
        input_size=32,
        hidden_size=64,
        seed=1001,
        description="Elman RNN, tanh activation, input 32, hidden 64.",
        activations=("Tanh",),
    ),
    ModelSpec(
        name="rnn_relu",
        op_type="RNN",
        input_size=32,
        hidden_size=64,
        seed=1002,
        description=(
            "Elman RNN, ReLU activation, input 32, hidden 64; "
            "R has spectral norm 0.9 so the state stays bounded."
        ),
        activations=("Relu",),
        recurrent_norm=0.9,
    ),
    ModelSpec(
        name="gru",
        op_type="GRU",
        input_size=16,
        hidden_size=128,
        seed=1003,
        description="GRU, input 16, hidden 128, linear_before_reset=1 (PyTorch convention).",
        linear_before_reset=1,
    ),
    ModelSpec(
        name="lstm",
        op_type="LSTM",
        input_size=64,
        hidden_size=96,
        seed=1004,
        description="LSTM, input 64, hidden 96, states h and c.",
    ),
)


def _weights(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw W [1, G*H, F], R [1, G*H, H] and B [1, 2*G*H] as float32 from the spec's seed."""
    gates = GATES[spec.op_type]
    hidden, features = spec.hidden_size, spec.input_size
    rng = np.random.default_rng(spec.seed)
    scale = 1.0 / math.sqrt(hidden)
    w = rng.standard_normal((1, gates * hidden, features)) * scale
    r = rng.standard_normal((1, gates * hidden, hidden)) * scale
    b = rng.standard_normal((1, 2 * gates * hidden)) * scale
    if spec.recurrent_norm is not None:
        # ||relu(a)|| <= ||a|| and ||R h|| <= ||R||_2 ||h||, so ||R||_2 < 1 keeps the ReLU
        # recurrence bounded for bounded input. The factor is rounded to 6 significant digits
        # so last-bit differences between LAPACK builds cannot change the float32 weights.
        sigma = float(np.linalg.norm(r[0], ord=2))
        factor = float(f"{spec.recurrent_norm / sigma:.6g}")
        r = r * factor
    return w.astype(np.float32), r.astype(np.float32), b.astype(np.float32)


def build_model(spec: ModelSpec) -> onnx.ModelProto:
    """Return the checked ONNX model for ``spec`` (one recurrent op plus a Squeeze of Y)."""
    hidden, features = spec.hidden_size, spec.input_size
    is_lstm = spec.op_type == "LSTM"
    w, r, b = _weights(spec)

    state_dims: list[int | str] = [1, "batch", hidden]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", features]),
        helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, state_dims),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", hidden]),
        helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, state_dims),
    ]
    # Op inputs: X, W, R, B, sequence_lens (absent), initial_h[, initial_c].
    op_inputs = ["x", "W", "R", "B", "", "initial_h"]
    op_outputs = ["Y", "Y_h"]
    if is_lstm:
        inputs.append(helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, state_dims))
        outputs.append(helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, state_dims))
        op_inputs.append("initial_c")
        op_outputs.append("Y_c")

    attributes: dict[str, Any] = {"hidden_size": hidden}
    if spec.activations is not None:
        attributes["activations"] = list(spec.activations)
    if spec.linear_before_reset is not None:
        attributes["linear_before_reset"] = spec.linear_before_reset

    nodes = [
        helper.make_node(
            spec.op_type, op_inputs, op_outputs, name=spec.op_type.lower(), **attributes
        ),
        # Y is [time, num_directions=1, batch, hidden]; drop the direction axis.
        helper.make_node("Squeeze", ["Y", "squeeze_axes"], ["y"], name="squeeze_direction"),
    ]
    initializers = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(r, "R"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "squeeze_axes"),
    ]
    graph = helper.make_graph(
        nodes, spec.name, inputs, outputs, initializer=initializers, doc_string=spec.description
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        doc_string=f"{PRODUCER}: {spec.description}",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_models(out_dir: Path) -> list[Path]:
    """Build every model into ``out_dir/NAME/model.onnx`` and return the written paths."""
    written = []
    for spec in SPECS:
        path = out_dir / spec.name / MODEL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build_model(spec).SerializeToString())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python models/build_models.py [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output directory (default: the directory holding this script)",
    )
    args = parser.parse_args(argv)
    for path in write_models(args.out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
