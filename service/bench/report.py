"""The bench's table: one Markdown table per model, then the ratios and targets."""

from __future__ import annotations

from typing import Any


def _f(value: Any, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def limits_line(doc: dict[str, Any], unit: str = "GFLOP/s") -> str:
    """The matmul limits, one decimal under 10 G; bf16 marked where the CPU emulates it."""
    emulated = doc.get("machine", {}).get("native_bf16") is False
    return ", ".join(f"{d} {v / 1e9:.{0 if v >= 1e10 else 1}f} {unit}"
                     + (" (emulated: no AVX-512 BF16 or AMX)" if emulated and d == "bfloat16" else "")
                     for d, v in doc["limits"].items())


def table(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    lines = [f"machine: {m.get('processor')} ({m.get('cores')} cores, torch threads {m.get('torch_threads')}), "
             f"device {m.get('device')}{' ' + m['gpu'] if m.get('gpu') else ''}"]
    if "limits" in doc:
        lines.append("matmul limit: " + limits_line(doc))
    for r in doc.get("models", []):
        if "skipped" in r:
            lines += ["", f"### {r['model']}: skipped ({r['skipped']})"]
            continue
        tk = r["tokens"]
        lines += ["", f"### {r['model']} ({r['architecture']}, {r['non_embedding_params'] / 1e6:.1f}M non-embedding "
                      f"params; {r['texts']} HH texts, tokens median {tk['median']}, p90 {tk['p90']})", "",
                  "| run | variant | batching | items/s | tokens/s | eff. GFLOP/s | of matmul | p50 ms | p99 ms | "
                  "agreement Δ pt | peak RSS MiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v, e in r["variants"].items():
            if "skipped" in e:
                lines.append(f"| in-process | {v} | skipped: {e['skipped'][:60]} |||||||||")
                continue
            b = e["best"]
            lines.append(f"| in-process | {v} | {b['policy']} (fill {b['fill']}) | {b['items_per_s']:.1f} | "
                         f"{b['tokens_per_s']:.0f} | {b['effective_flops'] / 1e9:.1f} | "
                         f"{_f(b['fraction_of_matmul'], '.0%')} ({e['matmul_dtype']}) | | | "
                         f"{e['agreement']['delta_points']} ({'ok' if e['agreement']['ok'] else 'FAIL'}) | |")
            if "bs1" in e["search"]:
                s = e["search"]["bs1"]
                lines.append(f"| in-process | {v} | one at a time | {s['items_per_s']:.1f} | {s['tokens_per_s']:.0f} | "
                             f"{s['effective_flops'] / 1e9:.1f} | {_f(s['fraction_of_matmul'], '.0%')} | | | | |")
        for name, h in r["http"].items():
            kind, variant = name.split(" ", 1)
            runs = [("one_item", f"1 item × {h['one_item']['concurrency']} concurrent")]
            if "bulk_64" in h:
                runs += [("bulk_64", f"64 items × {h['bulk_64']['concurrency']} concurrent"),
                         ("lone", "lone 1-item requests")]
            for key, what in runs:
                x = h[key]
                lines.append(f"| {kind} HTTP | {variant} | {what} | {x['items_per_s']:.1f} | | | | {x['p50_ms']} | "
                             f"{x['p99_ms']} | | {_f(h.get('peak_rss_mib'))} |")
        for v, e in r["variants"].items():
            if "best_of_k" in e:
                k = e["best_of_k"]
                lines.append(f"| best-of-{k['k']} in-process | {v} | prompt KV reused | {k['reuse']['items_per_s']} | | | | "
                             f"| | | |")
                lines.append(f"| best-of-{k['k']} in-process | {v} | prompt recomputed | {k['no_reuse']['items_per_s']} "
                             f"| | | | | | | |")
        ra, t = r["ratios"], r["targets"]
        lines += ["", f"service variant: {r['fast_variant']}; ratios: service ÷ naive fp32 {ra['service_vs_naive_fp32']}×, "
                      f"÷ naive same variant {ra['service_vs_naive_same_variant']}×, 64-item requests ÷ in-process best "
                      f"{ra['bulk_vs_inprocess_best']}×, 1-item ÷ in-process best {ra['one_item_vs_inprocess_best']}×; "
                      f"lone p99 {ra['lone_p99_ms']} ms vs budget (2 × forward + 10 ms) {ra['lone_budget_ms']} ms",
                  "targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in t.items())]
    if "soak" in doc:
        s = doc["soak"]
        lines += ["", f"soak: {s['requests']} one-item requests ({s['model']} {s['variant']}, {s['concurrency']} concurrent) "
                      f"at {s['items_per_s']} items/s, p99 {s['p99_ms']} ms; server RSS start {s['rss_start_mib']} → "
                      f"middle {s['rss_middle_mib']} → end {s['rss_end_mib']} MiB (peak {s['peak_rss_mib']} MiB; "
                      f"growth over the second half {s['growth_second_half_mib']} MiB)"]
    lines.append(f"\nbench process peak RSS {doc.get('bench_process_peak_rss_mib')} MiB; {doc.get('seconds')} s in all")
    return "\n".join(lines)
