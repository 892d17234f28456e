"""The bench's one run: every measurement, in order, into one JSON document and a table."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from . import http
from .measure import (Throughput, best_of_k_items, build_decoder_rm, forward_time, items_of, load_pairs,
                      matmul_flops, non_embedding_params, pairwise_agreement, policies, run_batched)
from .report import limits_line, table

MINILM = "minilm"
SMOLLM2 = "smollm2"
QUICK = dict(items=16, decoder_items=8, search_items=8, naive_items=8, lone=5, concurrency=8)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _variants(args: argparse.Namespace, device: str, decoder: bool) -> list[str]:
    if args.variants:
        return [v for v in args.variants if not (decoder and v.startswith("onnx"))] or ["torch-float32"]
    from ..backends.modeling import cpu_has_native_bf16

    out = ["torch-float32"]
    if device.startswith("cuda"):
        out += ["torch-bfloat16", "torch-float16"]
        if not decoder:
            out += ["onnx-float32"]
        return out
    if cpu_has_native_bf16():
        out.append("torch-bfloat16")
    if not decoder:
        out += ["onnx-float32", "onnx-int8"]
    return out


def _model_cfg(variant: str, path: str, device: str, max_length: int | None) -> dict[str, Any]:
    backend, _, kind = variant.partition("-")
    cfg: dict[str, Any] = {"path": path, "backend": backend, "device": device}
    if backend == "onnx":
        cfg["quantize"] = "int8" if kind == "int8" else "none"
    else:
        cfg["dtype"] = kind
    if max_length:
        cfg["max_length"] = max_length
    return cfg


def _load(cfg: dict[str, Any], threads: int | None) -> Any:
    from ..backends import load_backend
    from ..config import ModelConfig

    return load_backend(ModelConfig.model_validate({"name": "m", **cfg}), None, threads)


def _resolve_model(name: str, args: argparse.Namespace) -> tuple[str, str, int | None]:
    """(label, directory, max_length) of a --models entry."""
    if name == MINILM:
        from ..config import DEFAULT_CONFIG

        return "minilm-helpful", str(DEFAULT_CONFIG.parent / "default_models" / "helpful"), None
    if name == SMOLLM2:
        if not (args.policy_dir / "config.json").is_file():
            raise FileNotFoundError(f"{args.policy_dir} has no SmolLM2 model (run `make policy`)")
        out = build_decoder_rm(args.policy_dir, args.work / "models" / "smollm2-135m-rm")
        return "smollm2-135m-rm", str(out), args.decoder_max_length
    return Path(name).name, str(Path(name).resolve()), None


def _onnx_dir(label: str, path: str, work: Path) -> str:
    from ..backends.onnx_backend import ONNX_FILE, export_onnx

    out = work / "onnx" / label
    if not (out / ONNX_FILE).is_file():
        log(f"exporting {label} to ONNX in {out}")
        export_onnx(path, out)
    return str(out)


def _matmul_n(args: argparse.Namespace, device: str) -> int:
    return 512 if args.quick else (8192 if device.startswith("cuda") else 2048)


def bench_model(name: str, args: argparse.Namespace, device: str, pairs_all: list[Any]) -> dict[str, Any]:
    label, path, max_length = _resolve_model(name, args)
    ref = _load(_model_cfg("torch-float32", path, device, max_length), args.threads)
    decoder = ref.info.architecture == "decoder"
    n_items = args.decoder_items if decoder else args.items
    items = items_of(pairs_all[: n_items // 2])
    fmt = ref.formatter
    encoded = [e for e in fmt.encode_many(items, allow_truncation=True)]
    params = non_embedding_params(ref.loaded.model)
    flops_per_token = 2.0 * params
    tokens = sorted(len(e) for e in encoded)  # type: ignore[arg-type]
    result: dict[str, Any] = {
        "model": label, "path": path, "architecture": ref.info.architecture, "non_embedding_params": params,
        "max_length": fmt.max_length, "texts": len(items),
        "tokens": {"median": tokens[len(tokens) // 2], "p90": tokens[int(0.9 * (len(tokens) - 1))],
                   "mean": round(sum(tokens) / len(tokens), 1)},
        "variants": {}, "http": {}, "ratios": {},
    }
    del ref
    gc.collect()

    # -- in-process, each variant at its best batching ------------------------------------------
    search = encoded[: min(len(encoded), args.search_items)]
    reference_scores: list[float] | None = None
    forward_s: dict[str, float] = {}
    median_item = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))[len(encoded) // 2]  # type: ignore[arg-type]
    for variant in _variants(args, device, decoder):
        cfg = _model_cfg(variant, path, device, max_length)
        if cfg["backend"] == "onnx":
            cfg["path"] = _onnx_dir(label, path, args.work)
        try:
            backend = _load(cfg, args.threads)
        except Exception as exc:  # a variant this machine cannot run (no CUDA provider, …): say so
            log(f"{label} {variant}: skipped ({type(exc).__name__}: {exc})")
            result["variants"][variant] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        dtype = "float32" if cfg["backend"] == "onnx" else cfg["dtype"]
        # The limit again, just before this variant runs: on a shared machine the load changes.
        limit = matmul_flops(dtype, device, n=_matmul_n(args, device), seconds=0.3 if args.quick else 1.0)
        run_batched(backend, search[:4], policies(device.startswith("cuda"))["bs1"])  # warm-up
        tried: dict[str, Throughput] = {}
        for pname, pol in policies(device.startswith("cuda")).items():
            tried[pname] = run_batched(backend, search, pol, pname)
            log(f"{label} {variant} {pname}: {tried[pname].items_per_s:.1f} items/s")
        best_name = max(tried, key=lambda k: tried[k].items_per_s)
        full = run_batched(backend, encoded, policies(device.startswith("cuda"))[best_name], best_name)
        entry: dict[str, Any] = {
            "config": cfg, "matmul_dtype": dtype, "matmul_flops_now": limit,
            "search": {k: v.summary(flops_per_token, limit) for k, v in tried.items()},
            "best": full.summary(flops_per_token, limit),
        }
        if reference_scores is None:
            reference_scores = full.scores
        entry["agreement"] = pairwise_agreement(reference_scores, full.scores)
        forward_s[variant] = forward_time(backend, encoded[median_item], 5 if args.quick else 20)  # type: ignore[arg-type]
        entry["lone_forward_ms"] = round(1000 * forward_s[variant], 2)
        if decoder:
            entry["best_of_k"] = _best_of_k(backend, pairs_all, device, flops_per_token)
        result["variants"][variant] = entry
        log(f"{label} {variant}: best {best_name} {full.items_per_s:.1f} items/s, "
            f"agreement Δ {entry['agreement']['delta_points']} pt")
        del backend
        gc.collect()

    ok = {v: e for v, e in result["variants"].items() if "best" in e and e["agreement"]["ok"]}
    fast = max(ok, key=lambda v: ok[v]["best"]["items_per_s"])
    result["fast_variant"] = fast

    # -- over HTTP --------------------------------------------------------------------------------
    engine = {"min_fill": args.min_fill} if args.min_fill is not None else {}
    http_items = items
    naive_items = items[: args.naive_items]
    lone_item = [items[median_item]] * args.lone
    serve_variants = ["torch-float32"] + ([fast] if fast != "torch-float32" else [])
    for variant in serve_variants:
        cfg = dict(result["variants"][variant]["config"])
        with http.Server("service", cfg, args.work / "logs", args.threads, engine) as srv:
            http.warm(srv.url, http_items)
            one = http.load(srv.url, http_items, 1, args.concurrency)
            log(f"{label} service {variant} 1×{args.concurrency}: {one['items_per_s']} items/s")
            bulk = http.load(srv.url, http_items, 64, args.bulk_concurrency)
            log(f"{label} service {variant} 64/request: {bulk['items_per_s']} items/s")
            lone = http.load(srv.url, lone_item, 1, 1)
            result["http"][f"service {variant}"] = {"one_item": one, "bulk_64": bulk, "lone": lone, **srv.rss()}
        with http.Server("naive", cfg, args.work / "logs", args.threads) as srv:
            http.warm(srv.url, naive_items, 2)
            one = http.load(srv.url, naive_items, 1, args.concurrency)
            log(f"{label} naive {variant} 1×{args.concurrency}: {one['items_per_s']} items/s")
            result["http"][f"naive {variant}"] = {"one_item": one, **srv.rss()}

    # -- ratios and targets -------------------------------------------------------------------
    h, v = result["http"], result["variants"]
    svc = h[f"service {fast}"]
    r = result["ratios"]
    r["service_vs_naive_fp32"] = round(svc["one_item"]["items_per_s"] / h["naive torch-float32"]["one_item"]["items_per_s"], 2)
    r["service_vs_naive_same_variant"] = round(svc["one_item"]["items_per_s"] / h[f"naive {fast}"]["one_item"]["items_per_s"], 2)
    r["bulk_vs_inprocess_best"] = round(svc["bulk_64"]["items_per_s"] / v[fast]["best"]["items_per_s"], 2)
    r["one_item_vs_inprocess_best"] = round(svc["one_item"]["items_per_s"] / v[fast]["best"]["items_per_s"], 2)
    lone_budget = 2 * v[fast]["lone_forward_ms"] + 10
    r["lone_p99_ms"] = svc["lone"]["p99_ms"]
    r["lone_budget_ms"] = round(lone_budget, 1)
    r["fraction_of_matmul"] = v[fast]["best"]["fraction_of_matmul"]
    on_gpu = device.startswith("cuda")
    result["targets"] = {
        "one_item_ge_2x_naive_fp32": r["service_vs_naive_fp32"] >= 2.0,
        "one_item_ge_1x_naive_same_variant": r["service_vs_naive_same_variant"] >= 1.0,
        "bulk_ge_0.9x_inprocess": r["bulk_vs_inprocess_best"] >= 0.9,
        "effective_flops_ge_50pct": (r["fraction_of_matmul"] or 0) >= 0.5,
        "lone_p99_le_2x_forward_plus_10ms": svc["lone"]["p99_ms"] <= lone_budget,
        **({"gpu_one_item_ge_5x_naive": r["service_vs_naive_fp32"] >= 5.0} if on_gpu else {}),
    }
    return result


def _best_of_k(backend: Any, pairs: list[Any], device: str, flops_per_token: float) -> dict[str, Any]:
    """One prompt × 64 responses, with the engine's default policy, prompt KV reused or not."""
    from ..engine import BatchPolicy

    k = 64
    items = best_of_k_items(pairs, k, backend.formatter)
    enc = backend.formatter.encode_many(items, allow_truncation=True)
    pol = BatchPolicy(min_fill=0.0 if device.startswith("cuda") else 0.9)
    out: dict[str, Any] = {"k": k, "prompt_tokens": enc[0].prefix_len,
                           "mean_tokens": round(sum(len(e) for e in enc) / k, 1)}
    saved = backend.reuse_prefix
    runs = {}
    for reuse in (False, True):
        backend.reuse_prefix = reuse
        run_batched(backend, enc[:2], pol)
        runs[reuse] = run_batched(backend, enc, pol, "engine-default")
        out["reuse" if reuse else "no_reuse"] = {"items_per_s": round(runs[reuse].items_per_s, 2),
                                                 "seconds": round(runs[reuse].seconds, 3)}
    backend.reuse_prefix = saved
    out["speedup"] = round(runs[True].items_per_s / runs[False].items_per_s, 2)
    out["max_abs_diff"] = round(max(abs(a - b) for a, b in zip(runs[True].scores, runs[False].scores)), 5)
    log(f"best-of-{k}: reuse {out['reuse']['items_per_s']} vs {out['no_reuse']['items_per_s']} items/s")
    return out


def run(args: argparse.Namespace) -> int:
    """The whole bench; 0 also when skipped for want of data (it says so on stderr)."""
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, min(getattr(args, k), v))
    if not args.data.is_dir() or not list(args.data.glob("*.jsonl.gz")):
        print(f"logand bench: skipped: no HH-RLHF data (*.jsonl.gz) at {args.data}; pass --data DIR", file=sys.stderr)
        return 0
    import signal

    # A terminated bench still stops its server subprocesses (their context managers run).
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..backends.modeling import cpu_has_native_bf16, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.time()
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                    "load_average_at_start": os.getloadavg(),
                    "native_bf16": device.startswith("cuda") or cpu_has_native_bf16()},
        "quick": args.quick, "models": [],
    }
    n_pairs = max(args.items, args.decoder_items, args.naive_items) // 2 + 64
    pairs = load_pairs(args.data, n_pairs)
    if args.soak_only:
        doc["soak"] = _soak(args, device, pairs)
    else:
        dtypes = ["float32", "bfloat16"] + (["float16"] if device.startswith("cuda") else [])
        # emulated bf16 ran at 0.9 GFLOP/s: a 2048² product (17 GFLOP) would take ~19 s a round, so a small one
        doc["limits"] = {d: matmul_flops(d, device, seconds=0.3 if args.quick else 2.0,
                                         n=256 if d == "bfloat16" and not doc["machine"]["native_bf16"]
                                         else _matmul_n(args, device))
                         for d in dtypes}
        log("matmul FLOP/s: " + limits_line(doc, "G"))
        for name in args.models:
            try:
                doc["models"].append(bench_model(name, args, device, pairs))
            except FileNotFoundError as exc:
                log(f"{name}: skipped ({exc})")
                doc["models"].append({"model": name, "skipped": str(exc)})
        if args.soak:
            doc["soak"] = _soak(args, device, pairs)
    doc["bench_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    doc["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    text = table(doc)
    args.out.with_suffix(".md").write_text(f"Command: `{doc['command']}` ({doc['started']})\n\n{text}\n")
    print(text)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _soak(args: argparse.Namespace, device: str, pairs: list[Any]) -> dict[str, Any]:
    label, path, max_length = _resolve_model(args.models[0], args)
    variant = (args.variants or ["torch-float32"])[0]
    cfg = _model_cfg(variant, path, device, max_length)
    if cfg["backend"] == "onnx":
        cfg["path"] = _onnx_dir(label, path, args.work)
    engine = {"min_fill": args.min_fill} if args.min_fill is not None else {}
    n = args.soak or 20000
    with http.Server("service", cfg, args.work / "logs", args.threads, engine) as srv:
        log(f"soak: {n} one-item requests to {label} {variant}")
        out = http.soak(srv, items_of(pairs), n, args.concurrency)
    log(f"soak: RSS {out['rss_start_mib']} → {out['rss_middle_mib']} → {out['rss_end_mib']} MiB")
    return {"model": label, "variant": variant, **out}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
