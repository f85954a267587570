"""`rnnstream-server --check-model`: what it detects, its self-test, and the fixes it names."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from rnnstream.server.__main__ import main
from tests.conftest import HAS_TORCH, MODELS, NO_TORCH


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--check-model", str(path), "--device", "cpu"])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return int(code) if isinstance(code, int) else 1, captured.out, captured.err


@pytest.mark.parametrize("name", ["gru", "lstm", "co2_forecaster", "seq_classifier"])
def test_shipped_models_pass(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(MODELS / name, capsys)
    assert code == 0, err
    assert "execution provider: CPUExecutionProvider" in out
    assert "ok: 6 steps one at a time match one 6-step run" in out
    assert "ok: two sessions batched in one call match each run alone" in out
    if name == "lstm":
        assert "initial_h -> Y_h" in out and "initial_c -> Y_c" in out
    if name == "co2_forecaster":
        assert "x: float32 [batch, time, 1]  batch axis 0, time axis 1" in out
        assert "forecast: feeds y -> x" in out
    if name == "seq_classifier":
        assert "forecast: not available" in out


def _save(graph: onnx.GraphProto, folder: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _value(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_self_test_catches_a_graph_that_does_not_carry_its_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """y = running sum over the frame's time steps, state ignored: stepping loses the sum."""
    nodes = [
        helper.make_node(
            "Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [], [1])
        ),
        helper.make_node("CumSum", ["x", "axis"], ["y"]),
        helper.make_node("Identity", ["h0"], ["hn"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stateless",
        [_value("x", ["batch", "time", 2]), _value("h0", [1, "batch", 2])],
        [_value("y", ["batch", "time", 2]), _value("hn", [1, "batch", 2])],
    )
    code, _, err = check(_save(graph, tmp_path / "stateless"), capsys)
    assert code == 1
    assert "stepping one frame at a time vs one full-sequence run: 'y' differs" in err


def test_missing_state_pair_names_the_config_to_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [
        helper.make_node("Identity", ["frames"], ["scores"]),
        helper.make_node("Identity", ["memory_in"], ["memory_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "odd_names",
        [_value("frames", ["batch", "time", 2]), _value("memory_in", [1, "batch", 2])],
        [_value("scores", ["batch", "time", 2]), _value("memory_out", [1, "batch", 2])],
    )
    folder = _save(graph, tmp_path / "odd_names")
    code, _, err = check(folder, capsys)
    assert code == 1
    assert "found no state input/output pair" in err and "config.toml" in err
    (folder / "config.toml").write_text(
        '[[states]]\ninput = "memory_in"\noutput = "memory_out"\nbatch_axis = 1\n'
    )
    code, out, err = check(folder, capsys)
    assert code == 0, err
    assert "memory_in -> memory_out" in out


def test_bad_forecast_config_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "co2_copy"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((MODELS / "co2_forecaster" / "model.onnx").read_bytes())
    (folder / "config.toml").write_text('[forecast]\nfeed = { x = "hn" }\n')
    code, _, err = check(folder, capsys)
    assert code == 1
    assert "[forecast] feed must map every data input ['x'] to a data output ['y']" in err


def test_paths_that_are_not_model_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = check(tmp_path / "nothing", capsys)
    assert code == 1 and "does not exist" in err
    stray = tmp_path / "exported.onnx"
    stray.write_bytes((MODELS / "gru" / "model.onnx").read_bytes())
    code, _, err = check(stray, capsys)
    assert code == 1 and "as model.onnx" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    code, _, err = check(broken, capsys)
    assert code == 1 and "ONNX Runtime cannot load" in err


@pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH)
class TestPyTorchMistakes:
    """The export mistakes docs/bring-your-own-model.md warns about, caught before serving."""

    def test_state_without_a_dynamic_batch_axis(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from tests.torch_models import Recipe, build, export

        model = build(Recipe("gru", batch_first=True, layers=1))
        export(model, tmp_path / "fixed_state" / "model.onnx", dynamic_state_batch=False)
        code, _, err = check(tmp_path / "fixed_state", capsys)
        assert code == 1
        assert "'h0'" in err and "dynamic" in err

    def test_unnamed_dynamic_axes_on_a_batch_first_model(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from tests.torch_models import Recipe, build, export

        model = build(Recipe("lstm", batch_first=True, layers=1))
        export(model, tmp_path / "unnamed" / "model.onnx", dim_names=False)
        code, _, err = check(tmp_path / "unnamed", capsys)
        assert code == 1, "a batch-first graph read as time-major must not pass"
        assert "hint: the batch and time axes of ['x', 'y'] were guessed" in err
