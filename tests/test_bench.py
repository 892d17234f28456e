"""`logand bench` end to end in its tiny --quick mode, on tiny real models and synthetic HH rows.

This proves the bench runs (servers start, every section is measured and written); its figures
mean nothing at this size.  Speed is judged by the bench itself, never here.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from service.bench.measure import pairwise_agreement
from service.cli import main
from tests.tiny import WORDS


def hh_rows(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "tiny.jsonl.gz", "wt") as fh:
        for _ in range(n):
            prompt = f"\n\nHuman: {text(rng.randint(3, 30))}\n\nAssistant:"
            row = {"chosen": f"{prompt} {text(rng.randint(2, 20))}", "rejected": f"{prompt} {text(rng.randint(2, 20))}"}
            fh.write(json.dumps(row) + "\n")
    return path


def test_pairwise_agreement_counts_accuracy_and_flips() -> None:
    ref = [1.0, 0.0, 2.0, 3.0, 5.0, 4.0, 0.0, -1.0]  # 3 of 4 pairs chosen > rejected
    same = pairwise_agreement(ref, [x * 2 for x in ref])
    assert same["accuracy_reference"] == same["accuracy"] == 0.75 and same["order_flips"] == 0 and same["ok"]
    flipped = pairwise_agreement(ref, [1.0, 0.0, 2.0, 3.0, 4.0, 5.0, 0.0, -1.0])
    assert flipped["accuracy"] == 0.5 and flipped["delta_points"] == 25.0 and not flipped["ok"]


def test_bench_quick_runs_end_to_end(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--models", str(tiny_bert), "--data", str(hh_rows(tmp_path / "data")),
               "--variants", "torch-float32", "--threads", "1", "--out", str(out), "--work", str(tmp_path / "work")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["limits"]) >= {"float32", "bfloat16"} and all(v > 0 for v in doc["limits"].values())
    (model,) = doc["models"]
    best = model["variants"]["torch-float32"]["best"]
    assert best["items_per_s"] > 0 and best["effective_flops"] > 0 and 0 < best["fraction_of_matmul"]
    assert model["variants"]["torch-float32"]["agreement"]["ok"]  # fp32 agrees with itself
    for name in ("service torch-float32", "naive torch-float32"):
        assert model["http"][name]["one_item"]["items_per_s"] > 0 and model["http"][name]["peak_rss_mib"] > 0
    assert model["http"]["service torch-float32"]["bulk_64"]["p99_ms"] > 0
    assert set(model["ratios"]) >= {"service_vs_naive_fp32", "bulk_vs_inprocess_best", "lone_budget_ms"}
    printed = capsys.readouterr().out
    assert "| in-process | torch-float32 |" in printed
    from service.backends.modeling import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    assert doc["machine"]["native_bf16"] is native
    assert ("bfloat16" in printed) and (("(emulated: no AVX-512 BF16 or AMX)" in printed) is not native)


def test_bench_skips_clearly_without_data(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--quick", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "b.json")]) == 0
    assert "skipped: no HH-RLHF data" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
