"""The forward benchmark's bare-client payloads (the benchmark itself runs on demand)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench" / "forward.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_forward", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_baseline_payloads_carry_every_record_once_within_the_payload_size() -> None:
    bench = load_bench()
    count = 250_123  # across more than one fill chunk
    payloads = bench.baseline_payloads(count, max_bytes=49_152)
    seqs: list[int] = []
    for payload in payloads:
        assert len(payload) <= 49_152
        records = json.loads(payload)
        assert all(set(r) == {"ts", "values"} for r in records)
        seqs.extend(r["values"]["seq"] for r in records)
    assert seqs == list(range(count))
    # Packed full, as the gateway's outbox packs them: only a chunk's last one is short.
    assert sum(len(p) < 48_000 for p in payloads) <= count // bench.FILL_CHUNK + 1
