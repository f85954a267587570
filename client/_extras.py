"""Optional features and the extras that install them: checked before any work starts."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

__all__ = ["EXTRAS", "Extra", "MissingExtra", "missing", "require"]


@dataclass(frozen=True)
class Extra:
    """A pip extra: the modules it provides, by distribution, and the command that installs it."""

    name: str
    modules: dict[str, str]  # import name -> distribution name
    install: str


# The server's extras are alternatives: each provides the `onnxruntime` module.
_SERVER = {
    "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
}
EXTRAS = {
    "server": Extra(
        "cpu",
        {"onnxruntime": "onnxruntime", **_SERVER},
        "pip install 'rnnstream[cpu]' (or 'rnnstream[cuda]' for NVIDIA GPUs)",
    ),
    "redis": Extra("redis", {"redis": "redis"}, "pip install 'rnnstream[redis]'"),
    "loadtest": Extra(
        "loadtest", {"rich": "rich", "hdrh": "hdrhistogram"}, "pip install 'rnnstream[loadtest]'"
    ),
    "plot": Extra("plot", {"matplotlib": "matplotlib"}, "pip install 'rnnstream[plot]'"),
    # `rnnstream loadtest --verify` runs the model locally: ONNX Runtime from either server extra.
    "verify": Extra(
        "cpu",
        {"onnxruntime": "onnxruntime"},
        "pip install 'rnnstream[cpu]' (or 'rnnstream[cuda]' for NVIDIA GPUs)",
    ),
}


class MissingExtra(ImportError):
    """A feature was asked for whose extra is not installed; the message says what to install."""


def missing(feature: str) -> list[str]:
    """The distributions of `feature` whose modules cannot be imported here."""
    extra = EXTRAS[feature]
    absent: list[str] = []
    for module, distribution in extra.modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent that fails to import, or a None entry
            found = False
        if not found:
            absent.append(distribution)
    return absent


def require(feature: str, what: str) -> None:
    """Raise MissingExtra naming what is missing and how to install it, unless all is here."""
    absent = missing(feature)
    if absent:
        raise MissingExtra(f"{what} needs {', '.join(absent)}: {EXTRAS[feature].install}")
