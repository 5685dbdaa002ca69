"""Regenerate the Python stubs in this folder from `protos/*.proto`.

Run `elastune protos` (or `python -m services.proto.generate`). The generated files are
committed and never edited by hand; tests/common/test_protos.py fails when they drift.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
OUT_DIR = Path(__file__).resolve().parent

_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc on every proto file; return the files written into out_dir."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(p.name for p in protos)}")
        written = []
        for produced in sorted(Path(tmp).iterdir()):
            text = produced.read_text()
            # protoc writes `import x_pb2`; inside a package that must be relative.
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", text)
            target = out_dir / produced.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
