"""Independent float64 numpy implementations of the ONNX RNN, GRU and LSTM ops in a model file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

RECURRENT_OPS = ("RNN", "GRU", "LSTM")
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DEFAULT_ACTIVATIONS = {
    "RNN": ("Tanh",),
    "GRU": ("Sigmoid", "Tanh"),
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
}
# Node input index of each state input: initial_h is input 5, initial_c (LSTM only) is input 6.
STATE_INPUT_INDEX = {"RNN": (5,), "GRU": (5,), "LSTM": (5, 6)}


def _sigmoid(v: F64) -> F64:
    # Written through tanh so large negative arguments cannot overflow exp.
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def _relu(v: F64) -> F64:
    return np.maximum(v, 0.0)


def _tanh(v: F64) -> F64:
    return np.tanh(v)


ACTIVATIONS: dict[str, Callable[[F64], F64]] = {
    "Sigmoid": _sigmoid,
    "Tanh": _tanh,
    "Relu": _relu,
}


@dataclass(frozen=True)
class Reference:
    """One forward-direction recurrent op, with weights in float64, run step by step."""

    kind: str
    op_type: str
    input_size: int
    hidden_size: int
    w: F64  # [G*H, F], gate blocks stacked in ONNX order
    r: F64  # [G*H, H]
    wb: F64  # [G*H], first half of B
    rb: F64  # [G*H], second half of B
    activations: tuple[str, ...]
    linear_before_reset: bool
    state_names: tuple[str, ...]  # graph input names: ("initial_h",) or ("initial_h", "initial_c")

    def initial_state(self) -> dict[str, F32]:
        """Zero state for a batch of one, keyed by the state input names, each [1, 1, H]."""
        return {name: np.zeros((1, 1, self.hidden_size), np.float32) for name in self.state_names}

    def gate(self, index: int) -> tuple[F64, F64, F64, F64]:
        """Return (W, R, Wb, Rb) of gate block ``index`` (ONNX gate order)."""
        rows = slice(index * self.hidden_size, (index + 1) * self.hidden_size)
        return self.w[rows], self.r[rows], self.wb[rows], self.rb[rows]

    def run(self, x: npt.ArrayLike, state: dict[str, F32]) -> tuple[F32, dict[str, F32]]:
        """Run ``x`` [T, F] from ``state``; return y [T, H] and the new state (float32)."""
        xs = np.asarray(x, dtype=np.float64)
        if xs.ndim != 2 or xs.shape[1] != self.input_size:
            raise ValueError(f"x must be [T, {self.input_size}], got {xs.shape}")
        if set(state) != set(self.state_names):
            raise ValueError(f"state keys must be {self.state_names}, got {sorted(state)}")
        shape = (1, 1, self.hidden_size)
        for name, value in state.items():
            if np.shape(value) != shape:
                raise ValueError(f"state {name!r} must be {shape}, got {np.shape(value)}")

        h = np.asarray(state[self.state_names[0]], dtype=np.float64).reshape(self.hidden_size)
        c = (
            np.asarray(state[self.state_names[1]], dtype=np.float64).reshape(self.hidden_size)
            if self.op_type == "LSTM"
            else None
        )
        ys = np.empty((xs.shape[0], self.hidden_size), dtype=np.float64)
        for t, xt in enumerate(xs):
            if self.op_type == "RNN":
                h = self._rnn_step(xt, h)
            elif self.op_type == "GRU":
                h = self._gru_step(xt, h)
            else:
                assert c is not None
                h, c = self._lstm_step(xt, h, c)
            ys[t] = h

        new_state = {self.state_names[0]: h.astype(np.float32).reshape(shape)}
        if c is not None:
            new_state[self.state_names[1]] = c.astype(np.float32).reshape(shape)
        return ys.astype(np.float32), new_state

    def _act(self, index: int) -> Callable[[F64], F64]:
        return ACTIVATIONS[self.activations[index]]

    def _rnn_step(self, xt: F64, h: F64) -> F64:
        # Ht = f(Xt*(Wi^T) + Ht-1*(Ri^T) + Wbi + Rbi)
        f = self._act(0)
        wi, ri, wbi, rbi = self.gate(0)
        return f(wi @ xt + ri @ h + wbi + rbi)

    def _gru_step(self, xt: F64, h: F64) -> F64:
        # Gate order z (update), r (reset), h (hidden).
        f, g = self._act(0), self._act(1)
        wz, rz, wbz, rbz = self.gate(0)
        wr, rr, wbr, rbr = self.gate(1)
        wh, rh, wbh, rbh = self.gate(2)
        z = f(wz @ xt + rz @ h + wbz + rbz)
        r = f(wr @ xt + rr @ h + wbr + rbr)
        if self.linear_before_reset:
            # ht = g(Xt*(Wh^T) + (rt (.) (Ht-1*(Rh^T) + Rbh)) + Wbh)
            candidate = g(wh @ xt + r * (rh @ h + rbh) + wbh)
        else:
            # ht = g(Xt*(Wh^T) + (rt (.) Ht-1)*(Rh^T) + Rbh + Wbh)
            candidate = g(wh @ xt + rh @ (r * h) + rbh + wbh)
        # Ht = (1 - zt) (.) ht + zt (.) Ht-1
        return (1.0 - z) * candidate + z * h

    def _lstm_step(self, xt: F64, h: F64, c: F64) -> tuple[F64, F64]:
        # Gate order i (input), o (output), f (forget), c (cell); no peepholes.
        f, g, act_h = self._act(0), self._act(1), self._act(2)
        wi, ri, wbi, rbi = self.gate(0)
        wo, ro, wbo, rbo = self.gate(1)
        wf, rf, wbf, rbf = self.gate(2)
        wc, rc, wbc, rbc = self.gate(3)
        i = f(wi @ xt + ri @ h + wbi + rbi)
        forget = f(wf @ xt + rf @ h + wbf + rbf)
        cell = g(wc @ xt + rc @ h + wbc + rbc)
        c_new = forget * c + i * cell
        o = f(wo @ xt + ro @ h + wbo + rbo)
        return o * act_h(c_new), c_new


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _initializer(graph: onnx.GraphProto, name: str) -> F64:
    for init in graph.initializer:
        if init.name == name:
            return np.asarray(numpy_helper.to_array(init), dtype=np.float64)
    raise ValueError(f"{name!r} is not an initializer of graph {graph.name!r}")


def _input_name(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def load_reference(path: str | Path) -> Reference:
    """Read the single RNN/GRU/LSTM node of the ONNX model at ``path`` into a Reference."""
    model = onnx.load(str(path))
    graph = model.graph
    nodes = [node for node in graph.node if node.op_type in RECURRENT_OPS]
    if len(nodes) != 1:
        raise ValueError(f"expected exactly one recurrent node in {path}, found {len(nodes)}")
    node = nodes[0]
    op_type = node.op_type
    attrs = _attributes(node)

    direction = attrs.pop("direction", b"forward")
    if direction not in (b"forward", "forward"):
        raise NotImplementedError(f"direction {direction!r} is not supported")
    for name, neutral in (("layout", 0), ("input_forget", 0)):
        if attrs.pop(name, neutral) != neutral:
            raise NotImplementedError(f"{name} other than {neutral} is not supported")
    hidden_size = int(attrs.pop("hidden_size"))  # type: ignore[call-overload]
    linear_before_reset = bool(attrs.pop("linear_before_reset", 0))
    raw_activations = attrs.pop("activations", None)
    if attrs:
        raise NotImplementedError(f"unsupported {op_type} attributes: {sorted(attrs)}")
    if raw_activations is None:
        activations = DEFAULT_ACTIVATIONS[op_type]
    else:
        assert isinstance(raw_activations, list)
        activations = tuple(a.decode() if isinstance(a, bytes) else str(a) for a in raw_activations)
    if len(activations) != len(DEFAULT_ACTIVATIONS[op_type]):
        raise NotImplementedError(f"{op_type} with activations {activations} is not supported")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        raise NotImplementedError(f"unsupported activations {unknown}")
    if _input_name(node, 4):
        raise NotImplementedError("sequence_lens is not supported")
    if op_type == "LSTM" and _input_name(node, 7):
        raise NotImplementedError("LSTM peepholes (P) are not supported")

    gates = GATES[op_type]
    w = _initializer(graph, node.input[1])
    r = _initializer(graph, node.input[2])
    b_name = _input_name(node, 3)
    b = _initializer(graph, b_name) if b_name else np.zeros((1, 2 * gates * hidden_size))
    input_size = w.shape[-1]
    if w.shape != (1, gates * hidden_size, input_size):
        raise ValueError(f"W has shape {w.shape}")
    if r.shape != (1, gates * hidden_size, hidden_size):
        raise ValueError(f"R has shape {r.shape}")
    if b.shape != (1, 2 * gates * hidden_size):
        raise ValueError(f"B has shape {b.shape}")

    state_names = tuple(_input_name(node, i) for i in STATE_INPUT_INDEX[op_type])
    if not all(state_names):
        raise NotImplementedError(f"{op_type} node without explicit initial state inputs")

    kind = f"rnn_{activations[0].lower()}" if op_type == "RNN" else op_type.lower()
    return Reference(
        kind=kind,
        op_type=op_type,
        input_size=input_size,
        hidden_size=hidden_size,
        w=w[0],
        r=r[0],
        wb=b[0, : gates * hidden_size],
        rb=b[0, gates * hidden_size :],
        activations=activations,
        linear_before_reset=linear_before_reset,
        state_names=state_names,
    )
