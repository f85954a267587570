"""`rnnstream stream`: rows of a .npy or .csv file through one session, outputs to a file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream._connection import CommandError, Connection
from rnnstream._info import ModelInfo

__all__ = ["OUTPUT_SUFFIXES", "read_rows", "stream_file"]

OUTPUT_SUFFIXES = (".npy", ".npz", ".csv")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, skip_header: bool) -> tuple[npt.NDArray[Any], bool]:
    try:
        with path.open(newline="") as f:
            lines = [
                (n, row) for n, row in enumerate(csv.reader(f), 1) if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"{path}: {exc}") from None
    # A first row that is not all numbers is a header (column names).
    skipped = bool(lines) and (skip_header or not all(_is_number(c) for c in lines[0][1]))
    if skipped:
        lines = lines[1:]
    if not lines:
        raise CommandError(f"{path}: no rows of numbers")
    width = len(lines[0][1])
    values: list[list[float]] = []
    for number, row in lines:
        if len(row) != width:
            raise CommandError(
                f"{path} line {number}: {len(row)} values, the first row has {width}"
            )
        try:
            values.append([float(cell) for cell in row])
        except ValueError:
            bad = next(cell for cell in row if not _is_number(cell))
            raise CommandError(f"{path} line {number}: {bad.strip()!r} is not a number") from None
    return np.asarray(values, np.float64), skipped


def read_rows(path: Path, skip_header: bool = False) -> tuple[npt.NDArray[Any], bool]:
    """The frames of `path` (shape [time, ...]) and whether a header row was skipped."""
    if path.suffix == ".npy":
        try:
            array = np.load(path)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{path}: {exc}") from None
        skipped = False
    elif path.suffix == ".csv":
        array, skipped = _read_csv(path, skip_header)
    else:
        raise CommandError(f"{path}: expected a .npy or .csv file")
    if array.ndim < 2:
        raise CommandError(f"{path}: expected shape [time, features], got {list(array.shape)}")
    return array, skipped


def _check_suffix(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise CommandError(f"--output {path}: expected a .npy, .npz or .csv file")


def _check_output(path: Path, model: ModelInfo) -> None:
    """Refuse an output file that cannot hold the model's outputs, before anything is sent."""
    names = [t.name for t in model.outputs]
    if path.suffix in (".npy", ".csv") and len(names) != 1:
        raise CommandError(
            f"--output {path}: model {model.name!r} has outputs {names}; a .npz file holds them all"
        )


def _write(path: Path, stacked: dict[str, npt.NDArray[Any]]) -> None:
    if path.suffix == ".npz":
        np.savez(path, **stacked)  # type: ignore[arg-type]
        return
    (value,) = stacked.values()
    if path.suffix == ".npy":
        np.save(path, value)
        return
    if value.ndim > 2:
        raise CommandError(
            f"--output {path}: each frame's output has shape {list(value.shape[1:])}, not one "
            "row of values; write .npy instead"
        )
    # 9 significant digits: a float32 reads back exactly.
    np.savetxt(path, value.reshape(len(value), -1), delimiter=",", fmt="%.9g")


def stream_file(
    connection: Connection, model: str, rows: npt.NDArray[Any], output: Path, inflight: int
) -> int:
    """Stream `rows` through one session on `model`, write the outputs; returns frames sent."""
    from rnnstream._sync import Client

    _check_suffix(output)  # before connecting: nothing to wait for
    with Client(connection.target, **connection.client_kwargs()) as client:
        info = client.get_model(model)
        _check_output(output, info)
        dtype = (
            np.dtype(np.float32) if info.inputs[0].dtype == "unspecified" else info.inputs[0].dtype
        )
        rows = rows.astype(dtype, copy=False)
        collected: dict[str, list[npt.NDArray[Any]]] = {}
        try:
            with client.open(model) as session:
                for outputs in session.stream(iter(rows), inflight=inflight):
                    for name, value in outputs.items():
                        collected.setdefault(name, []).append(value)
        except ValueError as exc:  # the frames do not fit the model's inputs
            raise CommandError(f"{model}: {exc}") from None
    _write(output, {name: np.stack(values) for name, values in collected.items()})
    return len(rows)
