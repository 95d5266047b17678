"""Regenerate the checked-in gRPC code from schemas/pb/*.proto (`make proto`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "schemas" / "pb").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *protos]
    rc = protoc.main(args)
    if rc == 0:
        print(f"generated code for {len(protos)} proto file(s) in schemas/pb/")
    return rc


if __name__ == "__main__":
    sys.exit(main())
