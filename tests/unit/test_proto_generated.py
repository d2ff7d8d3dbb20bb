"""The committed generated modules must be exactly what the pinned grpcio-tools produces."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_the_protos(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = generator.generate(tmp_path)  # type: ignore[attr-defined]
    assert fresh, "protoc generated nothing"
    committed_dir = ROOT / "proto" / "bulkhead" / "v1"
    fresh_names = {p.name for p in fresh}
    committed_names = {p.name for p in committed_dir.glob("*_pb2*.py*")}
    assert fresh_names == committed_names, "run: .venv/bin/python scripts/gen_proto.py"
    stale = [p.name for p in fresh if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    assert not stale, f"stale generated modules {stale}; run: .venv/bin/python scripts/gen_proto.py"
