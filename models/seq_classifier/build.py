"""Train the seq_classifier GRU on synthetic waves and export it to ONNX.

A sequence-to-vector example: which of four frequencies does a noisy sine wave have? The model
emits class logits at every step; served with emit "last", a session answers once, at flush or
end, with the logits of the sequence's final step. Needs the `train` extra (torch). Run from the
repository root: python models/seq_classifier/build.py (about ten seconds, fixed seeds).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
PERIODS = (4.0, 7.0, 12.0, 20.0)  # time steps per cycle of each class
HIDDEN = 24
SEED = 7


class WaveClassifier(nn.Module):
    """GRU over one noisy sample per step; a linear head gives class logits at every step."""

    def __init__(self, hidden: int = HIDDEN, classes: int = len(PERIODS)) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, hn = self.gru(x, h0)
        return self.head(out), hn


def make_waves(
    rng: np.random.Generator, count: int, length: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Noisy sines with a random class, phase and amplitude: [count, length, 1] and labels."""
    labels = rng.integers(0, len(PERIODS), size=count)
    periods = np.asarray(PERIODS)[labels][:, None]
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1))
    amplitude = rng.uniform(0.5, 1.5, size=(count, 1))
    t = np.arange(length)[None, :]
    waves = amplitude * np.sin(2 * np.pi * t / periods + phase)
    waves += rng.normal(0, 0.3, size=waves.shape)
    return waves[..., None].astype(np.float32), labels.astype(np.int64)


def train(iterations: int) -> tuple[WaveClassifier, float]:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = WaveClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(iterations):
        x, labels = make_waves(rng, 64, int(rng.integers(20, 61)))
        logits, _ = model(torch.from_numpy(x), torch.zeros(1, 64, HIDDEN))
        loss = nn.functional.cross_entropy(logits[:, -1], torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    x, labels = make_waves(np.random.default_rng(SEED + 1), 1000, 40)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x), torch.zeros(1, 1000, HIDDEN))
    accuracy = float((logits[:, -1].argmax(-1).numpy() == labels).mean())
    return model, accuracy


def export(model: WaveClassifier, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model,
            (torch.zeros(2, 5, 1), torch.zeros(1, 2, HIDDEN)),
            str(path),
            input_names=["x", "h0"],
            output_names=["logits", "hn"],
            dynamic_axes={
                "x": {0: "batch", 1: "time"},
                "h0": {1: "batch"},
                "logits": {0: "batch", 1: "time"},
                "hn": {1: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, accuracy = train(args.iterations)
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "model.onnx")
    print(f"accuracy on 1000 fresh 40-step waves: {accuracy:.3f}")


if __name__ == "__main__":
    main()
