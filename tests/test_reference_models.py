"""The shipped recurrent ONNX models match the numpy reference, carry state, and rebuild exactly."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from tests.reference import Reference, load_reference

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
BUILD_SCRIPT = MODELS_DIR / "build_models.py"
MODEL_NAMES = ("rnn_tanh", "rnn_relu", "gru", "lstm")
# name -> (op type, input size F, hidden size H)
EXPECTED = {
    "rnn_tanh": ("RNN", 32, 64),
    "rnn_relu": ("RNN", 32, 64),
    "gru": ("GRU", 16, 128),
    "lstm": ("LSTM", 64, 96),
}
# Which graph output carries each state input forward.
STATE_OUTPUT = {"initial_h": "Y_h", "initial_c": "Y_c"}
ATOL = 1e-5
T = 50

F32 = npt.NDArray[np.float32]


def model_path(name: str) -> Path:
    return MODELS_DIR / name / "model.onnx"


@functools.cache
def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])


@functools.cache
def reference(name: str) -> Reference:
    return load_reference(model_path(name))


def run_ort(name: str, x: F32, state: dict[str, F32]) -> tuple[F32, dict[str, F32]]:
    """Run the ORT session on x [T, B, F]; return y [T, B, H] and the state outputs renamed."""
    output_names = ["y", *(STATE_OUTPUT[k] for k in state)]
    y, *states = session(name).run(output_names, {"x": x, **state})
    return y, dict(zip(state, states, strict=True))


def random_input(name: str, seed: int, steps: int = T, batch: int = 1) -> F32:
    features = EXPECTED[name][1]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, batch, features)).astype(np.float32)


def random_state(name: str, seed: int, batch: int) -> dict[str, F32]:
    hidden = EXPECTED[name][2]
    rng = np.random.default_rng(seed)
    return {
        k: (0.5 * rng.standard_normal((1, batch, hidden))).astype(np.float32)
        for k in reference(name).state_names
    }


def max_abs_diff(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_interface(name: str) -> None:
    op_type, features, hidden = EXPECTED[name]
    path = model_path(name)
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "rnnstream"
    assert model.doc_string.startswith("rnnstream")
    assert model.ir_version in (8, 9)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [n.op_type for n in model.graph.node] == [op_type, "Squeeze"]

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    states = ["initial_h", "initial_c"] if op_type == "LSTM" else ["initial_h"]
    expected_inputs = {"x": ["time", "batch", features]}
    expected_outputs = {"y": ["time", "batch", hidden]}
    for state in states:
        expected_inputs[state] = [1, "batch", hidden]
        expected_outputs[STATE_OUTPUT[state]] = [1, "batch", hidden]
    assert {v.name: dims(v) for v in model.graph.input} == expected_inputs
    assert {v.name: dims(v) for v in model.graph.output} == expected_outputs

    node = model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["hidden_size"] == hidden
    assert node.input[4] == ""  # no sequence_lens
    assert attrs.get("layout", 0) == 0
    if name == "rnn_tanh":
        assert attrs["activations"] == [b"Tanh"]
    if name == "rnn_relu":
        assert attrs["activations"] == [b"Relu"]
    if name == "gru":
        assert attrs["linear_before_reset"] == 1

    assert [i.name for i in session(name).get_inputs()] == list(expected_inputs)
    assert [o.name for o in session(name).get_outputs()] == list(expected_outputs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_reads_model(name: str) -> None:
    op_type, features, hidden = EXPECTED[name]
    ref = reference(name)
    assert (ref.kind, ref.op_type, ref.input_size, ref.hidden_size) == (
        name,
        op_type,
        features,
        hidden,
    )
    state = ref.initial_state()
    assert list(state) == (["initial_h", "initial_c"] if name == "lstm" else ["initial_h"])
    for value in state.values():
        assert value.shape == (1, 1, hidden)
        assert value.dtype == np.float32
        assert not value.any()
    assert ref.linear_before_reset is (name == "gru")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_sequence_matches_reference(name: str) -> None:
    ref = reference(name)
    x = random_input(name, seed=11)
    state = ref.initial_state()
    y, new_state = run_ort(name, x, state)
    y_ref, new_state_ref = ref.run(x[:, 0], state)

    assert y.shape == (T, 1, ref.hidden_size)
    assert y.dtype == np.float32
    assert max_abs_diff(y[:, 0], y_ref) <= ATOL
    assert new_state.keys() == new_state_ref.keys()
    for key in new_state:
        assert max_abs_diff(new_state[key], new_state_ref[key]) <= ATOL
    # Y_h is the last step of y.
    np.testing.assert_array_equal(new_state["initial_h"][0], y[-1])
    # The sequence is not trivial: outputs move and are not saturated or dead.
    assert y.std() > 0.05
    if name != "rnn_relu":  # the other outputs are bounded by 1; most must be well inside
        assert np.mean(np.abs(y) > 0.999) < 0.1
    assert np.mean(y != 0) > 0.3  # ReLU leaves about half the units at zero


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_of_three_matches_reference(name: str) -> None:
    ref = reference(name)
    x = random_input(name, seed=12, batch=3)
    state = random_state(name, seed=13, batch=3)
    y, new_state = run_ort(name, x, state)
    assert y.shape == (T, 3, ref.hidden_size)
    for b in range(3):
        seq_state = {k: v[:, b : b + 1] for k, v in state.items()}
        y_ref, new_state_ref = ref.run(x[:, b], seq_state)
        assert max_abs_diff(y[:, b], y_ref) <= ATOL
        for key in new_state:
            assert max_abs_diff(new_state[key][:, b : b + 1], new_state_ref[key]) <= ATOL
    # Each sequence in the batch is independent: running one alone gives the same result.
    y_alone, _ = run_ort(name, x[:, 1:2], {k: v[:, 1:2] for k, v in state.items()})
    assert max_abs_diff(y_alone[:, 0], y[:, 1]) <= 1e-6
    # The batch entries really differ, so the per-sequence comparison is meaningful.
    assert max_abs_diff(y[:, 0], y[:, 1]) > 0.1


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("splits", [(20,), (1, 7, 33)])
def test_chained_runs_equal_one_long_run(name: str, splits: tuple[int, ...]) -> None:
    ref = reference(name)
    x = random_input(name, seed=14, batch=2)
    state0 = random_state(name, seed=15, batch=2)
    y_full, state_full = run_ort(name, x, state0)

    state = state0
    pieces = []
    for chunk in np.split(x, list(splits)):
        y_chunk, state = run_ort(name, chunk, state)
        pieces.append(y_chunk)
    y_chained = np.concatenate(pieces)
    assert max_abs_diff(y_chained, y_full) <= 1e-6
    for key in state_full:
        assert max_abs_diff(state[key], state_full[key]) <= 1e-6

    # The reference carries state the same way, and agrees with the chained ORT run.
    ref_state = {k: v[:, :1] for k, v in state0.items()}
    ref_pieces = []
    for chunk in np.split(x[:, 0], list(splits)):
        y_chunk_ref, ref_state = ref.run(chunk, ref_state)
        ref_pieces.append(y_chunk_ref)
    assert max_abs_diff(np.concatenate(ref_pieces), y_chained[:, 0]) <= ATOL
    for key in state_full:
        assert max_abs_diff(ref_state[key], state[key][:, :1]) <= ATOL


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_matters(name: str) -> None:
    """A carried state changes the output, so the chaining test cannot pass by ignoring it."""
    x = random_input(name, seed=16)
    zero = reference(name).initial_state()
    y_zero, _ = run_ort(name, x, zero)
    y_state, _ = run_ort(name, x, random_state(name, seed=17, batch=1))
    assert max_abs_diff(y_zero[0], y_state[0]) > 1e-2


def _swap_lstm_gates(ref: Reference) -> Reference:
    """Read the LSTM blocks as i, f, o, c instead of the ONNX order i, o, f, c."""
    h = ref.hidden_size
    order = np.concatenate([np.arange(block * h, (block + 1) * h) for block in (0, 2, 1, 3)])
    return dataclasses.replace(
        ref, w=ref.w[order], r=ref.r[order], wb=ref.wb[order], rb=ref.rb[order]
    )


WRONG_REFERENCES = {
    "rnn_tanh": lambda ref: dataclasses.replace(ref, activations=("Relu",)),
    "rnn_relu": lambda ref: dataclasses.replace(ref, activations=("Tanh",)),
    "gru": lambda ref: dataclasses.replace(ref, linear_before_reset=False),
    "lstm": _swap_lstm_gates,
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tolerance_detects_a_wrong_cell(name: str) -> None:
    """A plausible mistake in the cell equations is far outside the comparison tolerance."""
    wrong = WRONG_REFERENCES[name](reference(name))
    x = random_input(name, seed=11)
    state = wrong.initial_state()
    y, _ = run_ort(name, x, state)
    y_wrong, _ = wrong.run(x[:, 0], state)
    assert max_abs_diff(y[:, 0], y_wrong) > 100 * ATOL


def test_rnn_relu_stays_bounded() -> None:
    ref = reference("rnn_relu")
    assert np.linalg.norm(ref.r, ord=2) < 1.0
    x = random_input("rnn_relu", seed=18, steps=200, batch=3)
    y, state = run_ort("rnn_relu", x, random_state("rnn_relu", seed=19, batch=3))
    assert np.isfinite(y).all()
    assert np.abs(y).max() < 20.0
    # Still alive at the end of the sequence, not decayed to all zeros.
    assert np.mean(y[-50:] > 0) > 0.2
    assert state["initial_h"].max() > 0


def test_build_is_reproducible(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert built == sorted(f"{name}/model.onnx" for name in MODEL_NAMES)
    for name in MODEL_NAMES:
        assert (tmp_path / name / "model.onnx").read_bytes() == model_path(name).read_bytes(), name
