"""`elastune tuning export|import|split` against the real store."""

from __future__ import annotations

import asyncio
import json
import uuid

from services.cli import main as cli_main
from services.common.store import connect
from services.tuner.table import ProfilePoint, TuningTable


def point(stage: str, share: float, batch: int, thr: float, p95: float, **kw) -> ProfilePoint:
    workload = {"context_len": 256} if stage == "decode" else {"prompt_len": 128}
    return ProfilePoint(model="tiny", stage=stage, device="cpu", share=share, config={"max_batch_size": batch},
                        throughput_tokens_per_s=thr, latency_p50_ms=p95, latency_p95_ms=p95, workload=workload, **kw)


def stored(store_url: str, prefix: str) -> TuningTable:
    async def load():
        store = connect(store_url)
        try:
            return await TuningTable.load(store, prefix)
        finally:
            await store.aclose()

    return asyncio.run(load())


def test_export_import_round_trip_and_merge(tmp_path, store_url, capsys) -> None:
    a, b = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    table = TuningTable()
    for p in (point("decode", 0.5, 8, 900.0, 20.0), point("decode", 1.0, 8, 1500.0, 15.0),
              point("prefill", 0.5, 4, 3000.0, 90.0, source="online", samples=3)):
        table.add(p)
    src = tmp_path / "in.json"
    table.export(str(src))
    assert cli_main(["tuning", "import", str(src), "--store", store_url, "--prefix", a]) == 0
    out = tmp_path / "out.json"
    assert cli_main(["tuning", "export", str(out), "--store", store_url, "--prefix", a]) == 0
    again = TuningTable.import_file(str(out))
    assert sorted(map(repr, again.all_points())) == sorted(map(repr, table.all_points()))
    # Import merges: an online observation is averaged in by samples, other rows stay.
    extra = TuningTable()
    extra.add(point("prefill", 0.5, 4, 2000.0, 110.0, source="online", samples=1))
    extra.export(str(tmp_path / "extra.json"))
    assert cli_main(["tuning", "import", str(tmp_path / "extra.json"), "--store", store_url, "--prefix", a]) == 0
    merged = stored(store_url, a)
    [row] = merged.points("tiny", "prefill", "cpu", 0.5)
    assert (row.samples, row.throughput_tokens_per_s) == (4, 2750.0)
    assert len(merged.all_points()) == 3
    # --replace puts exactly the file's table in another prefix's place
    assert cli_main(["tuning", "import", str(tmp_path / "extra.json"), "--replace", "--store", store_url,
                     "--prefix", a]) == 0
    assert len(stored(store_url, a).all_points()) == 1
    assert stored(store_url, b).version == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    assert cli_main(["tuning", "import", str(bad), "--store", store_url, "--prefix", b]) == 2
    assert "is not a tuning table export" in capsys.readouterr().err


def test_split_recommends_the_share_pair_with_the_most_headroom(tmp_path, capsys) -> None:
    table = TuningTable()
    for share, pre, dec in ((0.25, 1000.0, 300.0), (0.5, 2000.0, 500.0), (0.75, 2900.0, 650.0), (1.0, 3500.0, 700.0)):
        table.add(point("prefill", share, 4, pre, 100.0))
        table.add(point("decode", share, 16, dec, 30.0))
    path = tmp_path / "t.json"
    table.export(str(path))
    # Decode saturates early: prefill takes the larger share when prompts dominate...
    assert cli_main(["tuning", "split", "--file", str(path), "--prefill-load", "2000", "--decode-load", "200"]) == 0
    assert "prefill share 0.75, decode share 0.25" in capsys.readouterr().out
    # ...and gives it back when output tokens dominate.
    assert cli_main(["tuning", "split", "--file", str(path), "--prefill-load", "500", "--decode-load", "480"]) == 0
    assert "prefill share 0.25, decode share 0.75" in capsys.readouterr().out
    assert cli_main(["tuning", "split", "--file", str(path), "--prefill-load", "5000", "--decode-load", "480"]) == 1
    assert "no split" in capsys.readouterr().out
