"""The benchmark command on the tiny preset: it runs every registered method and writes well-formed JSON
(no timing assertion: speed is reported by the benchmark, never tested)."""
import json

from pipeline import bench
from pipeline.methods import METHODS


def test_bench_runs_every_method_and_writes_json(workdir):
    result = bench.main(["--preset", "tiny", "--steps", "1"])
    written = json.loads((workdir / "results/bench/bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {(r["method"], r["precision"]) for r in written["rows"]} == {
        (m, p) for m in METHODS for p in ("fp32", "bf16")}
    for row in written["rows"]:
        assert row["images_per_s"] > 0 and row["flop_ratio_to_mae"] > 0 and row["step_ratio_to_mae"] > 0
    assert [r["step_ratio_to_mae"] for r in written["rows"] if r["method"] == "mae"] == [1.0, 1.0]
