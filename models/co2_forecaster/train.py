"""Train the co2_forecaster GRU on the weekly Mauna Loa CO2 series and export it to ONNX.

Needs the `train` extra (torch, statsmodels): pip install -e '.[train]'. Run from the repository
root: python models/co2_forecaster/train.py. It writes model.onnx, weights.npz and MODEL_CARD.md
beside this file. Seeds are fixed; a run takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 32
    window: int = 156  # three years of weeks per training sequence
    batch: int = 32
    iterations: int = 600
    lr: float = 3e-3
    warmup_steps: int = 8  # first steps of a window start from a zero state: not scored
    seed: int = 2024
    train_fraction: float = 0.7
    validation_fraction: float = 0.1  # the next 10%; the last 20% is the held-out test tail
    eval_every: int = 50
    threads: int = 2


class Co2Forecaster(nn.Module):
    """GRU over raw ppm values; predicts next week's value as this week's plus a learned step.

    Normalisation lives in the graph, so clients send and receive plain ppm.
    """

    def __init__(self, hidden: int, mean: float, scale: float, step_scale: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("step_scale", torch.tensor(step_scale, dtype=torch.float32))
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (x - self.mean) / self.scale
        out, hn = self.gru(z, h0)
        return x + self.head(out) * self.step_scale, hn


def load_series() -> tuple[F32, list[str]]:
    """Weekly CO2 in ppm, gaps filled by linear interpolation in time, and the week dates."""
    from statsmodels.datasets import co2

    frame = co2.load_pandas().data
    filled = frame["co2"].interpolate(method="time").bfill()
    dates = [d.strftime("%Y-%m-%d") for d in frame.index]
    return filled.to_numpy(dtype=np.float32), dates


def module_from_weights(path: Path) -> Co2Forecaster:
    """Rebuild the trained PyTorch module from weights.npz."""
    data = np.load(path)
    hidden = int(data["gru.weight_hh_l0"].shape[1])
    model = Co2Forecaster(hidden, 0.0, 1.0, 1.0)
    model.load_state_dict({k: torch.from_numpy(np.array(data[k])) for k in data.files})
    return model.eval()


def one_step_predictions(model: Co2Forecaster, series: F32) -> F32:
    """Run the whole series from a zero state; element t predicts series[t + 1]."""
    with torch.no_grad():
        x = torch.from_numpy(series).view(1, -1, 1)
        h0 = torch.zeros(1, 1, model.gru.hidden_size)
        y, _ = model(x, h0)
    return np.asarray(y.view(-1).numpy(), dtype=np.float32)


def mae_on(preds: F32, series: F32, start: int, stop: int) -> tuple[float, float]:
    """One-step MAE of the model and of persistence for targets series[start:stop]."""
    model_err = np.abs(preds[start - 1 : stop - 1] - series[start:stop])
    persist_err = np.abs(series[start - 1 : stop - 1] - series[start:stop])
    return float(model_err.mean()), float(persist_err.mean())


def train(cfg: TrainConfig, series: F32) -> tuple[Co2Forecaster, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n = len(series)
    n_train = int(n * cfg.train_fraction)
    n_val = int(n * cfg.validation_fraction)
    train_part = series[:n_train]
    steps = np.diff(train_part)
    model = Co2Forecaster(
        cfg.hidden, float(train_part.mean()), float(train_part.std()), float(steps.std())
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg.iterations)
    series_t = torch.from_numpy(series)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    started = time.perf_counter()
    for it in range(1, cfg.iterations + 1):
        starts = rng.integers(0, n_train - cfg.window - 1, size=cfg.batch)
        idx = torch.from_numpy(starts[:, None] + np.arange(cfg.window + 1)[None, :])
        windows = series_t[idx]
        x, target = windows[:, :-1, None], windows[:, 1:, None]
        y, _ = model(x, torch.zeros(1, cfg.batch, cfg.hidden))
        error = (y - target)[:, cfg.warmup_steps :] / model.step_scale
        loss = (error**2).mean()
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            val_mae, _ = mae_on(
                one_step_predictions(model, series), series, n_train, n_train + n_val
            )
            if best is None or val_mae < best[0]:
                best = (val_mae, it, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    preds = one_step_predictions(model, series)
    test_mae, test_persist = mae_on(preds, series, n_train + n_val, n)
    val_mae, val_persist = mae_on(preds, series, n_train, n_train + n_val)
    report = {
        "config": asdict(cfg),
        "rows": n,
        "train_rows": n_train,
        "validation_rows": n_val,
        "test_rows": n - n_train - n_val,
        "best_iteration": best[1],
        "validation_mae": val_mae,
        "validation_persistence_mae": val_persist,
        "test_mae": test_mae,
        "test_persistence_mae": test_persist,
        "train_seconds": time.perf_counter() - started,
        "normalisation": {
            "mean": float(model.mean),
            "scale": float(model.scale),
            "step_scale": float(model.step_scale),
        },
    }
    return model, report


def export_onnx(model: Co2Forecaster, path: Path) -> None:
    hidden = model.gru.hidden_size
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; it still writes RNN graphs with state inputs cleanly.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 5, 1), torch.zeros(1, 2, hidden)),
            str(path),
            input_names=["x", "h0"],
            output_names=["y", "hn"],
            dynamic_axes={
                "x": {0: "batch", 1: "time"},
                "h0": {1: "batch"},
                "y": {0: "batch", 1: "time"},
                "hn": {1: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


def save_weights(model: Co2Forecaster, path: Path) -> None:
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})


def model_card(report: dict[str, Any], dates: list[str]) -> str:
    cfg = report["config"]
    n_train, n_val = report["train_rows"], report["validation_rows"]
    norm = report["normalisation"]
    gain = 100 * (1 - report["test_mae"] / report["test_persistence_mae"])
    return f"""# co2_forecaster

A one-step-ahead forecaster of weekly atmospheric CO2 at Mauna Loa: send this week's value in
ppm, get next week's predicted value in ppm. Built by `models/co2_forecaster/train.py`
(`pip install -e '.[train]'`, then `python models/co2_forecaster/train.py`).

## Interface

| tensor | shape | meaning |
| --- | --- | --- |
| `x` (input) | `[batch, time, 1]` float32 | observed CO2, ppm (raw: no scaling by the client) |
| `h0` (state in) | `[1, batch, {cfg["hidden"]}]` float32 | GRU hidden state |
| `y` (output) | `[batch, time, 1]` float32 | predicted CO2 for the following week, ppm |
| `hn` (state out) | `[1, batch, {cfg["hidden"]}]` float32 | GRU hidden state |

Inside the graph: `z = (x - {norm["mean"]:.4f}) / {norm["scale"]:.4f}`, a one-layer GRU
(hidden {cfg["hidden"]}), a linear head, and `y = x + head * {norm["step_scale"]:.4f}` (the
standard deviation of week-to-week changes in the training part). Because `y` has the shape of
`x`, the `Forecast` RPC can feed each prediction back as the next week's input.

## Data

statsmodels' `co2` dataset (`statsmodels.datasets.co2`): weekly means of atmospheric CO2 at
Mauna Loa Observatory, {dates[0]} to {dates[-1]}, {report["rows"]} weeks. The 59 missing weeks
are filled by linear interpolation in time.

## Split (chronological)

| part | weeks | rows |
| --- | --- | --- |
| train | {dates[0]} to {dates[n_train - 1]} | {n_train} |
| validation (checkpoint choice) | {dates[n_train]} to {dates[n_train + n_val - 1]} | {n_val} |
| held-out test tail | {dates[n_train + n_val]} to {dates[-1]} | {report["test_rows"]} |

Normalisation constants come from the train part only.

## Training

Adam, learning rate {cfg["lr"]} with cosine decay, {cfg["iterations"]} iterations of
{cfg["batch"]} random {cfg["window"]}-week windows from the train part, each starting from a zero
state; loss is the mean squared one-step error (in units of the weekly-change scale) after the
first {cfg["warmup_steps"]} steps of a window; gradient norm clipped at 1. The checkpoint with the
lowest validation MAE (checked every {cfg["eval_every"]} iterations) is kept: iteration
{report["best_iteration"]}. Seed {cfg["seed"]}, {cfg["threads"]} CPU threads; training took
{report["train_seconds"]:.0f} s of wall time on the (shared) machine that built this file.

## Evaluation

One-step-ahead MAE, the whole series streamed from a zero state (as a server session would), each
week's prediction scored against the next week's value. Persistence predicts next week = this
week.

| part | GRU MAE (ppm) | persistence MAE (ppm) |
| --- | --- | --- |
| validation | {report["validation_mae"]:.4f} | {report["validation_persistence_mae"]:.4f} |
| **held-out test tail** | **{report["test_mae"]:.4f}** | **{report["test_persistence_mae"]:.4f}** |

On the test tail the GRU's error is {gain:.1f}% below persistence.

## Limits

Trained on 1958-2001 data; the trend keeps rising past the train range, so inputs far above it
(the normalised input grows) are extrapolation. Multi-week forecasts by feeding predictions back
accumulate error. Not for any decision that matters.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    args = parser.parse_args(argv)
    cfg = TrainConfig(iterations=args.iterations)
    torch.set_num_threads(cfg.threads)
    series, dates = load_series()
    model, report = train(cfg, series)
    if report["test_mae"] >= report["test_persistence_mae"]:
        raise SystemExit(f"model does not beat persistence: {json.dumps(report, indent=2)}")
    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, args.out / "model.onnx")
    save_weights(model, args.out / "weights.npz")
    (args.out / "MODEL_CARD.md").write_text(model_card(report, dates))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
