#!/usr/bin/env python3
"""Median (min-max) over several `piiguard-bench run --json` outputs, as in bench/RESULTS.md.

usage: bench/summarize.py bench/out/unpinned-*.json
"""
import json
import statistics
import sys
from collections import defaultdict


def fmt(xs, prec=0):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{prec}f}"
    return f"{m:.{prec}f} ({min(xs):.{prec}f}-{max(xs):.{prec}f})"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    rows = defaultdict(lambda: defaultdict(list))
    ratios = defaultdict(list)
    order = []
    for r in runs:
        for s in r["scenarios"]:
            for x in [s] + ([s["half_rate"]] if s.get("half_rate") else []):
                n = x["name"]
                if n not in order:
                    order.append(n)
                for k in ("calls_per_sec", "items_per_sec", "server_cpu_us_per_call",
                          "server_cpu_us_per_item", "vault_cpu_us_per_call", "client_cpu_us_per_call",
                          "store_cpu_us_per_call", "server_cores", "errors", "late_sends"):
                    rows[n][k].append(x.get(k))
                for k in ("p50_us", "p99_us", "p999_us"):
                    rows[n][k].append(x["latency"][k])
        for q in r["ratios"]:
            ratios[(q["what"], q.get("target"))].append(q["value"])
    print(f"{len(runs)} run(s): " + ", ".join(paths))
    print("| scenario | calls/s | items/s | p50 us | p99 us | p99.9 us | server CPU us/call | OpenBao CPU us/call | PostgreSQL CPU us/call | server cores | errors | late sends |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in order:
        d = rows[n]
        print(f"| {n} | {fmt(d['calls_per_sec'])} | {fmt(d['items_per_sec'])} | {fmt(d['p50_us'])} | "
              f"{fmt(d['p99_us'])} | {fmt(d['p999_us'])} | {fmt(d['server_cpu_us_per_call'], 1)} | "
              f"{fmt(d['vault_cpu_us_per_call'], 1)} | {fmt(d['store_cpu_us_per_call'], 1)} | {fmt(d['server_cores'], 2)} | {int(sum(e or 0 for e in d['errors']))} | "
              f"{fmt(d['late_sends'])} |")
    print()
    print("| ratio (same run) | value | target |")
    print("|---|---|---|")
    for (what, target), vs in ratios.items():
        print(f"| {what} | {fmt(vs, 3)} | {target or ''} |")


if __name__ == "__main__":
    main(sys.argv[1:])
