"""``logand bench``: how fast the service scores, against the machine's limit and a naive server.

One run, one machine, every figure measured (nothing estimated):

* the limit: an n×n matmul's FLOP/s in fp32 and bf16 (and fp16 on a GPU);
* each backend variant (torch fp32/bf16, onnxruntime fp32/int8) in-process at its best batching
  (a few batch policies tried on part of the texts, the best run on all of them): items/s,
  tokens/s, effective FLOP/s = 2 × non-embedding params × real tokens / s and that as a fraction
  of the matmul figure of its dtype; and whether its rankings agree with fp32 (pairwise accuracy
  on HH chosen/rejected pairs within 0.5 point) — a variant that disagrees is never chosen;
* the service (``logand serve`` in a subprocess, real HTTP on 127.0.0.1) in fp32 and in the
  fastest agreeing variant: 64 concurrent one-item requests, 64-item requests, and a lone
  one-item request's latency against its forward time;
* the naive baseline (:mod:`service.bench.naive`) served the same way, in fp32 and in the
  service's variant; the ratios; and the peak RSS of every server;
* decoders: best-of-k (one prompt × 64 responses) with and without the prompt's KV cache reused;
* ``--soak N``: N one-item requests of varied lengths, the server's RSS at start, middle, end.

Texts are real HH-RLHF transcripts (``--data``).  Models: the default MiniLM reward model and a
SmolLM2-135M decoder with a scalar head (built from ``models/smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf"


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmark: matmul limit, backends in-process, service vs naive over HTTP",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--models", nargs="+", default=["minilm", "smollm2"],
                   help="minilm (the default helpful model), smollm2 (SmolLM2-135M + scalar head), or a model "
                        "directory")
    b.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of HH-RLHF *.jsonl.gz files")
    b.add_argument("--items", type=int, default=1024, help="texts per encoder model (half chosen, half rejected)")
    b.add_argument("--decoder-items", type=int, default=128, help="texts per decoder model")
    b.add_argument("--search-items", type=int, default=256, help="texts the batch-policy search runs on")
    b.add_argument("--naive-items", type=int, default=256, help="texts sent to the naive baseline")
    b.add_argument("--lone", type=int, default=50, help="sequential lone one-item requests timed")
    b.add_argument("--concurrency", type=int, default=64, help="clients of the one-item workload")
    b.add_argument("--bulk-concurrency", type=int, default=2, help="clients of the 64-item workload")
    b.add_argument("--variants", nargs="+", default=None,
                   help="backend-dtype variants, e.g. torch-float32 torch-bfloat16 onnx-float32 onnx-int8 "
                        "(default: all that this device supports; onnx only for encoders)")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch/onnxruntime (default: all)")
    b.add_argument("--min-fill", type=float, default=None, help="the service's engine.min_fill (default: its own)")
    b.add_argument("--decoder-max-length", type=int, default=512, help="context of the decoder (naive pads to it)")
    b.add_argument("--policy-dir", type=Path, default=REPO / "models" / "smollm2-135m-instruct",
                   help="SmolLM2 directory (make policy)")
    b.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="built models, exports, server logs")
    b.add_argument("--soak", type=int, nargs="?", const=20000, default=None,
                   help="also send N one-item requests of varied lengths (default N 20000) and report RSS growth")
    b.add_argument("--soak-only", action="store_true", help="run only the soak (on the first model)")
    b.add_argument("--quick", action="store_true", help="tiny sizes: proves the bench runs, figures mean little")
    b.add_argument("--out", type=Path, default=REPO / "reports" / "performance" / "bench.json", help="JSON output")
    b.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .run import run

    return run(args)
