"""Puts the example models into the wheel: models/*/ lies outside the package folders that
pyproject.toml maps, so the build copies each model's serving files into
rnnstream/server/examples/ (`rnnstream-server --example-models`). Everything else is in
pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# What serving a model needs; not its build or training scripts, nor its training data.
EXAMPLE_FILES = ("model.onnx", "config.toml", "MODEL_CARD.md")


class BuildWithExamples(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install serves the checkout's models/ itself
        target = Path(self.build_lib, "rnnstream", "server", "examples")
        for folder in sorted(Path("models").iterdir()):
            files = [folder / name for name in EXAMPLE_FILES if (folder / name).is_file()]
            if folder / "model.onnx" not in files:
                continue
            self.mkpath(str(target / folder.name))
            for file in files:
                self.copy_file(str(file), str(target / folder.name / file.name))


setup(cmdclass={"build_py": BuildWithExamples})
