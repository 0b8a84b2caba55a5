"""Aggregation throughput and memory (issue 4), all ratios measured within one run.

1. Fold throughput: updates folded per second and GB/s (fp32 model bytes per second) for
   models of 100 k, 1 M and 10 M parameters, beside a plain ``np.copyto`` of the same bytes
   from the same source buffers into one destination (the memory-bandwidth ceiling).
   Copy and each variant alternate in every repetition; the ratio reported is the median of
   the per-repetition ratios, so load from other processes on the 2 shared cores hits both.
   Variants: ``fedavg`` (float32 accumulation, what strategies use), ``fedavg`` with
   ``accumulate=float64``, ``fedavg`` with ``clip_norm`` (one more read for the norm), and
   decode + fold of the wire blob for the ``fp32`` and ``int8`` codecs (int8 skipped if
   ``parse_codec("int8")`` is not there).
2. Peak RSS of a subprocess that folds N updates per round, N = 10, 100, 1000, generated one
   at a time as they would arrive: flat for streaming strategies, linear for robust ones.
3. Precision of float32 accumulation against float64 for 1,000 updates, in units of the
   float32 spacing (ulp) of the weights the mean is added to.

    .venv/bin/python bench/aggregate/run.py [--sizes 100000,1000000,10000000] [--reps 15]
        [--out runs/bench/aggregate]

Writes ``OUT/results.json`` and ``OUT/results.md`` (tables for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aggregator.strategies import make_strategy  # noqa: E402
from fedge.limits import DEFAULT_LIMITS  # noqa: E402


def model_spec(params: int) -> dict[str, tuple[int, ...]]:
    """An MLP-like layout: one big weight matrix, a bias, and a small head."""
    cols = 1000 if params >= 1_000_000 else 100
    rows = (params - 1010) // (cols + 1)
    spec = {"fc1.weight": (rows, cols), "fc1.bias": (rows,), "head": (10, 101)}
    spec["pad"] = (params - sum(math.prod(s) for s in spec.values()),)
    return spec


def make_updates(
    spec: dict[str, tuple[int, ...]], k: int, seed: int
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: (1e-3 * rng.standard_normal(s, dtype=np.float32)) for n, s in spec.items()}
        for _ in range(k)
    ]


def timed(fn: Any, items: list[Any]) -> float:
    t = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t) / len(items)


def fold_variants(spec: dict[str, tuple[int, ...]], updates: list[dict[str, np.ndarray]]) -> dict:
    """name -> (callable on one item, items): each call handles one update."""
    variants: dict[str, tuple[Any, list[Any]]] = {}
    for label, opts in (
        ("fedavg fp32-acc", {}),
        ("fedavg fp64-acc", {"accumulate": "float64"}),
        ("fedavg fp32-acc + clip_norm", {"clip_norm": "1e9"}),
    ):
        s = make_strategy("fedavg", opts)
        s.begin_round(spec)
        variants[label] = (lambda d, s=s: s.fold(d, 100), updates)
    try:
        from fedge.codecs import parse_codec
    except ImportError:  # pragma: no cover
        return variants
    for codec_name in ("fp32", "int8"):
        try:
            codec = parse_codec(codec_name)
        except ValueError:
            print(f"codec {codec_name} not available: skipped", file=sys.stderr)
            continue
        blobs = [codec.encode(u) for u in updates]
        s = make_strategy("fedavg")
        s.begin_round(spec)

        def decode_fold(blob: bytes, s: Any = s, codec: Any = codec) -> None:
            s.fold(codec.decode(blob, spec, DEFAULT_LIMITS), 100)

        variants[f"decode {codec_name} + fold"] = (decode_fold, blobs)
        variants[f"_wire {codec_name}"] = (None, [len(b) for b in blobs])
    return variants


def bench_throughput(params: int, reps: int) -> dict[str, Any]:
    spec = model_spec(params)
    nbytes = params * 4
    k = max(4, math.ceil(64e6 / nbytes))  # sources together larger than the 32 MiB L3
    updates = make_updates(spec, k, seed=params)
    dst = {n: np.empty(s, np.float32) for n, s in spec.items()}

    def copy(u: dict[str, np.ndarray]) -> None:
        for n, a in u.items():
            np.copyto(dst[n], a)

    variants = fold_variants(spec, updates)
    wire = {name[6:]: statistics.mean(v[1]) for name, v in variants.items() if name[:6] == "_wire "}
    variants = {n: v for n, v in variants.items() if not n.startswith("_wire ")}
    for fn, items in variants.values():  # warm up: page in buffers, BLAS, codecs
        timed(fn, items[:2])
    timed(copy, updates)
    copy_t: list[float] = []
    res: dict[str, dict[str, list[float]]] = {n: {"t": [], "ratio": []} for n in variants}
    for _ in range(reps):
        for name, (fn, items) in variants.items():
            c = timed(copy, updates)
            t = timed(fn, items)
            copy_t.append(c)
            res[name]["t"].append(t)
            res[name]["ratio"].append(c / t)
    out: dict[str, Any] = {
        "params": params,
        "bytes_fp32": nbytes,
        "updates_cycled": k,
        "copy": {
            "gbps_median": nbytes / statistics.median(copy_t) / 1e9,
            "gbps_best": nbytes / min(copy_t) / 1e9,
        },
        "variants": {},
    }
    for name, r in res.items():
        t_med = statistics.median(r["t"])
        out["variants"][name] = {
            "updates_per_s": 1 / t_med,
            "gbps_median": nbytes / t_med / 1e9,
            "gbps_best": nbytes / min(r["t"]) / 1e9,
            "ratio_to_copy_median": statistics.median(r["ratio"]),
            "ratio_to_copy_best_of_each": min(copy_t) / min(r["t"]),
        }
        codec = name.split()[1] if name.startswith("decode ") else None
        if codec in wire:
            out["variants"][name]["wire_bytes"] = wire[codec]
    return out


# -- peak RSS in a child process --------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(strategy: str, n: int, params: int) -> dict[str, Any]:
    spec = model_spec(params)
    opts = {"f": "1"} if "krum" in strategy else None
    s = make_strategy(strategy, opts)
    s.begin_round(spec)
    weights = {k: np.zeros(v, np.float32) for k, v in spec.items()}
    rng = np.random.default_rng(0)
    # Reset the high-water mark (VmHWM) so imports and set-up do not hide the fold's peak.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    t = time.perf_counter()
    for _ in range(n):
        s.fold({k: rng.standard_normal(v, dtype=np.float32) for k, v in spec.items()}, 10)
    s.finish(weights)
    return {"base_kib": base, "peak_kib": _status_kib("VmHWM"), "seconds": time.perf_counter() - t}


def bench_rss(params: int, strategies: list[str], counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for strategy in strategies:
        for n in counts:
            cmd = [sys.executable, __file__, "--rss-child", f"{strategy},{n},{params}"]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append(
                {
                    "strategy": strategy,
                    "updates": n,
                    "params": params,
                    "peak_rss_mb": r["peak_kib"] / 1024,
                    "growth_mb": (r["peak_kib"] - r["base_kib"]) / 1024,
                    "seconds": r["seconds"],
                }
            )
            print(
                f"  rss {strategy:10s} n={n:5d}: peak {rows[-1]['peak_rss_mb']:.0f} MB, "
                f"+{rows[-1]['growth_mb']:.1f} MB over the pre-fold baseline",
                flush=True,
            )
    return rows


# -- precision -----------------------------------------------------------------------------------


def bench_precision(n: int = 1000, params: int = 100_000) -> dict[str, Any]:
    spec = {"w": (params,)}
    rng = np.random.default_rng(1)
    weights = {"w": (0.05 * rng.standard_normal(params)).astype(np.float32)}
    samples = rng.integers(10, 1000, size=n)
    s32 = make_strategy("fedavg", {"accumulate": "float32"})
    s64 = make_strategy("fedavg", {"accumulate": "float64"})
    s32.begin_round(spec)
    s64.begin_round(spec)
    ref = np.zeros(params)
    for i in range(n):
        # Non-IID-like: a shared direction plus device noise of 10x its size.
        d = {"w": (1e-4 + 1e-3 * rng.standard_normal(params)).astype(np.float32)}
        s32.fold(d, int(samples[i]))
        s64.fold(d, int(samples[i]))
        ref += float(samples[i]) * d["w"].astype(np.float64)
    exact_mean = ref / samples.sum()
    m32 = s32._aggregate()["w"].astype(np.float64)
    m64 = s64._aggregate()["w"].astype(np.float64)
    new32, new64 = s32.finish(weights)["w"], s64.finish(weights)["w"]
    ulp_diff = np.abs(new32.astype(np.float64) - new64) / np.spacing(np.abs(new64))
    return {
        "updates": n,
        "params": params,
        "rms_step": float(np.sqrt(np.mean(exact_mean**2))),
        "max_abs_err_mean_fp32acc": float(np.abs(m32 - exact_mean).max()),
        "max_abs_err_mean_fp64acc": float(np.abs(m64 - exact_mean).max()),
        "new_weights_differing_fp32_vs_fp64": float((new32 != new64).mean()),
        "new_weights_ulp_diff_p99": float(np.percentile(ulp_diff, 99)),
        "new_weights_ulp_diff_p999": float(np.percentile(ulp_diff, 99.9)),
    }


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
        for i in threadpool_info()
    ]


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| params | variant | updates/s | GB/s (median) | copy GB/s (median) | ratio to copy |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for t in res["throughput"]:
        for name, v in t["variants"].items():
            lines.append(
                f"| {t['params']:,} | {name} | {v['updates_per_s']:,.0f} | {v['gbps_median']:.1f} "
                f"| {t['copy']['gbps_median']:.1f} | **{v['ratio_to_copy_median']:.2f}** |"
            )
    lines += [
        "",
        "| strategy | updates per round | params | peak RSS MB | growth MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rss"]:
        lines.append(
            f"| {r['strategy']} | {r['updates']} | {r['params']:,} | {r['peak_rss_mb']:.0f} "
            f"| {r['growth_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rss-params", type=int, default=100_000)
    ap.add_argument("--rss-counts", default="10,100,1000")
    ap.add_argument("--rss-strategies", default="fedavg,fedadam,median")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "aggregate")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        name, n, params = a.rss_child.split(",")
        print(json.dumps(rss_child(name, int(n), int(params))))
        return
    cmd = " ".join([".venv/bin/python", "bench/aggregate/run.py", *sys.argv[1:]])
    res: dict[str, Any] = {
        "command": cmd,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas": blas_info(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        },
        "throughput": [],
    }
    for p in (int(x) for x in a.sizes.split(",")):
        t = bench_throughput(p, a.reps)
        res["throughput"].append(t)
        c = t["copy"]
        print(f"{p:>10,} params: copy {c['gbps_median']:.1f} GB/s (best {c['gbps_best']:.1f})")
        for name, v in t["variants"].items():
            print(
                f"    {name:28s} {v['updates_per_s']:9,.0f} upd/s {v['gbps_median']:6.1f} GB/s "
                f"ratio {v['ratio_to_copy_median']:.2f} "
                f"(best-of-each {v['ratio_to_copy_best_of_each']:.2f})",
                flush=True,
            )
    res["rss"] = bench_rss(
        a.rss_params, a.rss_strategies.split(","), [int(x) for x in a.rss_counts.split(",")]
    )
    res["precision"] = bench_precision()
    print("precision:", json.dumps(res["precision"], indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "results.md").write_text(markdown(res))
    print(f"wrote {a.out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
