"""Model detection: graphs the server cannot read are refused with advice; config.toml helps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rnnstream import AsyncClient
from rnnstream.server.core import ModelConfigError
from rnnstream.server.core._runtime import load_model
from tests.conftest import RunningServer
from tests.reference import load_reference

FEATURES, HIDDEN = 6, 5


def _tiny_rnn(
    folder: Path,
    *,
    state_in: str = "initial_h",
    state_out: str = "Y_h",
    batch: int | str = "batch",
    with_state: bool = True,
) -> Path:
    """Write folder/model.onnx: one tanh RNN op, its Y squeezed to y [time, batch, H]."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((1, HIDDEN, FEATURES)) * 0.5).astype(np.float32)
    r = (rng.standard_normal((1, HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((1, 2 * HIDDEN)) * 0.1).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", batch, FEATURES])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", batch, HIDDEN])]
    op_inputs = ["x", "W", "R", "B"]
    op_outputs = ["Y"]
    if with_state:
        inputs.append(
            helper.make_tensor_value_info(state_in, TensorProto.FLOAT, [1, batch, HIDDEN])
        )
        outputs.append(
            helper.make_tensor_value_info(state_out, TensorProto.FLOAT, [1, batch, HIDDEN])
        )
        op_inputs += ["", state_in]
        op_outputs.append(state_out)
    nodes = [
        helper.make_node("RNN", op_inputs, op_outputs, hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["Y", "axes"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(r, "R"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_model_without_state_pair_is_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "stateless", with_state=False)
    with pytest.raises(ModelConfigError) as exc:
        load_model("stateless", tmp_path / "stateless", "cpu", 1)
    message = str(exc.value)
    assert "found no state input/output pair" in message
    assert "Write models/stateless/config.toml" in message
    assert "[[states]]" in message and "input = " in message and "output = " in message


def test_unknown_state_names_are_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "custom", state_in="state_in", state_out="state_out")
    with pytest.raises(ModelConfigError) as exc:
        load_model("custom", tmp_path / "custom", "cpu", 1)
    message = str(exc.value)
    assert "inputs ['state_in', 'x'], outputs ['state_out', 'y']" in message
    assert "config.toml" in message and "[[states]]" in message


def test_fixed_batch_axis_is_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "fixed", batch=1)
    with pytest.raises(ModelConfigError) as exc:
        load_model("fixed", tmp_path / "fixed", "cpu", 1)
    message = str(exc.value)
    assert "holds the batch" in message
    assert "Write models/fixed/config.toml" in message and "batch_axis = 1" in message


def test_config_naming_a_fixed_batch_axis_is_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "fixed", batch=1)
    (tmp_path / "fixed" / "config.toml").write_text(
        "[inputs.x]\nbatch_axis = 1\ntime_axis = 0\n[outputs.y]\nbatch_axis = 1\ntime_axis = 0\n"
        '[[states]]\ninput = "initial_h"\noutput = "Y_h"\nbatch_axis = 1\n'
    )
    with pytest.raises(ModelConfigError, match="fixed size 1 on its batch axis 1; re-export"):
        load_model("fixed", tmp_path / "fixed", "cpu", 1)


def test_config_naming_missing_tensors_is_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "custom", state_in="state_in", state_out="state_out")
    (tmp_path / "custom" / "config.toml").write_text(
        '[[states]]\ninput = "state_in"\noutput = "state_output"\nbatch_axis = 1\n'
    )
    with pytest.raises(ModelConfigError, match="'state_in' -> 'state_output' does not name"):
        load_model("custom", tmp_path / "custom", "cpu", 1)


def test_broken_config_is_refused(tmp_path: Path) -> None:
    _tiny_rnn(tmp_path / "custom")
    (tmp_path / "custom" / "config.toml").write_text("[[states]\n")
    with pytest.raises(ModelConfigError, match=r"config\.toml"):
        load_model("custom", tmp_path / "custom", "cpu", 1)


async def test_config_with_custom_state_names_serves(
    tmp_path: Path, make_server: Callable[..., RunningServer]
) -> None:
    path = _tiny_rnn(tmp_path / "custom", state_in="state_in", state_out="state_out")
    (tmp_path / "custom" / "config.toml").write_text(
        '[[states]]\ninput = "state_in"\noutput = "state_out"\nbatch_axis = 1\n'
    )
    running = make_server(model_repository=tmp_path)
    x = np.random.default_rng(8).standard_normal((15, FEATURES)).astype(np.float32)
    async with AsyncClient(running.target) as client:
        (info,) = await client.list_models()
        assert info.name == "custom"
        assert [(s.input_name, s.output_name) for s in info.states] == [("state_in", "state_out")]
        assert [t.name for t in info.inputs] == ["x"]
        assert [t.name for t in info.outputs] == ["y"]
        a, b = await client.open("custom"), await client.open("custom")
        ys = [(await a.step(row))["y"] for row in x]
        b_first = (await b.step(x[:4]))["y"]
        chunked = [(await b.step(part))["y"] for part in np.split(x[4:], [3, 8])]
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x[:, None], "state_in": np.zeros((1, 1, HIDDEN), np.float32)}
    )[0][:, 0]
    ref = load_reference(path)
    y_ref, _ = ref.run(x, ref.initial_state())
    for got in (np.stack(ys), np.concatenate([b_first, *chunked])):
        np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, y_ref, rtol=0, atol=1e-5)
