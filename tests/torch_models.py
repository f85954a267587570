"""Small PyTorch recurrent models exported to ONNX the way docs/bring-your-own-model.md says.

Import only after tests.conftest.require_torch() (torch is the opt-in extra `torch`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

F32 = npt.NDArray[np.float32]
KINDS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass(frozen=True)
class Recipe:
    kind: str
    batch_first: bool
    layers: int
    features: int = 3
    hidden: int = 5

    @property
    def name(self) -> str:
        return f"{self.kind}_{'bf' if self.batch_first else 'tf'}_l{self.layers}"


class Wrapped(nn.Module):
    """The recurrent layer with its state as plain inputs and outputs: x, h0 (, c0)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.rnn = KINDS[recipe.kind](
            recipe.features, recipe.hidden, num_layers=recipe.layers, batch_first=recipe.batch_first
        )

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.recipe.kind == "lstm":
            y, (hn, cn) = self.rnn(x, (state[0], state[1]))
            return y, hn, cn
        y, hn = self.rnn(x, state[0])
        return y, hn


def build(recipe: Recipe, seed: int = 0) -> Wrapped:
    torch.manual_seed(seed)
    return Wrapped(recipe).eval()


def export(
    model: Wrapped, path: Path, *, dynamic_state_batch: bool = True, dim_names: bool = True
) -> None:
    """Export with h0/c0 as inputs and dynamic batch and time axes (the documented recipe).

    `dynamic_state_batch=False` reproduces a common mistake: the state's batch axis is fixed.
    """
    r = model.recipe
    batch_axis, time_axis = (0, 1) if r.batch_first else (1, 0)
    x_shape = [2, 4, r.features] if r.batch_first else [4, 2, r.features]
    lstm = r.kind == "lstm"
    state_names = ["h0", "c0"] if lstm else ["h0"]
    out_names = ["y", "hn", "cn"] if lstm else ["y", "hn"]
    states = tuple(torch.zeros(r.layers, 2, r.hidden) for _ in state_names)
    # dim_names=False: dynamic axes without names, another mistake (the server cannot tell
    # a batch-first layout from a time-major one).
    data_axes: dict[int, str] | list[int] = (
        {batch_axis: "batch", time_axis: "time"} if dim_names else [0, 1]
    )
    axes: dict[str, dict[int, str] | list[int]] = {"x": data_axes, "y": data_axes}
    if dynamic_state_batch:
        for name in (*state_names, *out_names[1:]):
            axes[name] = {1: "batch"} if dim_names else [1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model,
            (torch.zeros(*x_shape), *states),
            str(path),
            input_names=["x", *state_names],
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def run_full(model: Wrapped, x: F32) -> F32:
    """PyTorch's outputs for one session's sequence x [T, features], from a zero state."""
    r = model.recipe
    xt = torch.from_numpy(x).unsqueeze(0 if r.batch_first else 1)
    zeros = tuple(torch.zeros(r.layers, 1, r.hidden) for _ in range(2 if r.kind == "lstm" else 1))
    with torch.no_grad():
        y = model(xt, *zeros)[0]
    return np.asarray(y.squeeze(0 if r.batch_first else 1).numpy(), dtype=np.float32)
