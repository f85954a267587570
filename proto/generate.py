"""Regenerate the rnnstream.proto package (Python code and .pyi stubs) from its .proto files.

The .proto files sit at their import path under proto/ (rnnstream/proto/v1/rnnstream.proto), so
the generated modules import each other as rnnstream.proto.*, with no rewriting."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def _plugin(name: str) -> str:
    # Look beside the interpreter first so a virtual environment's plugins win over PATH.
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf (the dev extra)")
    return found


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("rnnstream/proto/**/*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)"
    )
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
