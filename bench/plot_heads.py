#!/usr/bin/env python3
"""Charts of a bench/compare_heads run.

    ./build/bench/compare_heads --benchmark_out=heads.json --benchmark_out_format=json
    python3 bench/plot_heads.py heads.json out_dir/

Writes into out_dir (created if needed):
    decode_time.png       decode time per token against kv_heads, one line per context
                          (solid: the whole layer; dotted: the attention alone)
    kv_bytes.png          KV-cache size of the whole context against kv_heads
    speed_vs_quality.png  decode speed-up over the source layout against the quality drift
                          (1 - cosine similarity of the layer's outputs) of the pooled layer
    prefill.png           causal prefill tokens/s against kv_heads
    compare_heads.png     the four in one figure (the README's chart)

Needs matplotlib (Debian: python3-matplotlib); uses the Agg backend, so no display is needed.
With --benchmark_repetitions the mean aggregates are used.
"""
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib import ticker  # noqa: E402

NAME = re.compile(r"^(decode|prefill)/kv:(\d+)/(ctx|len):(\d+)")
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def load(path):
    """Rows of the run: {(kind, kv_heads, tokens): benchmark entry}, plus the context."""
    with open(path) as f:
        data = json.load(f)
    entries = data.get("benchmarks", [])
    have_means = any(e.get("aggregate_name") == "mean" for e in entries)
    rows = {}
    for e in entries:
        match = NAME.match(e.get("run_name", e["name"]))
        if not match or e.get("error_occurred"):
            continue
        if have_means and e.get("aggregate_name") != "mean":
            continue
        if not have_means and e.get("run_type", "iteration") != "iteration":
            continue
        key = (match.group(1), int(match.group(2)), int(match.group(4)))
        entry = dict(e)
        entry["ms"] = e["real_time"] * TO_MS[e.get("time_unit", "ns")]
        rows[key] = entry
    if not rows:
        sys.exit("plot_heads: %s holds no compare_heads results" % path)
    repetitions = max(e.get("repetitions", 1) for e in rows.values()) if have_means else 1
    return rows, data.get("context", {}), repetitions


def layout_name(kv, source_kv, q_heads):
    if kv == q_heads:
        return "MHA"
    if kv == 1:
        return "MQA"
    return "GQA-%d" % kv


def tokens_label(n):
    return "%dk" % (n // 1024) if n % 1024 == 0 else str(n)


def kv_axis(ax, kv_list):
    ax.set_xscale("log", base=2)
    ax.set_xticks(kv_list)
    ax.set_xticklabels([str(k) for k in kv_list])
    ax.set_xlim(max(kv_list) * 1.3, min(kv_list) / 1.3)  # MHA on the left, MQA on the right
    ax.set_xlabel("kv_heads")
    ax.grid(True, which="major", alpha=0.3)


def plot_decode(ax, rows, contexts, kv_list, colors):
    for context, color in zip(contexts, colors):
        kvs = [k for k in kv_list if ("decode", k, context) in rows]
        ax.plot(kvs, [rows[("decode", k, context)]["ms"] for k in kvs], "o-", color=color,
                label="ctx %s" % tokens_label(context))
        ax.plot(kvs, [rows[("decode", k, context)]["attn_ms"] for k in kvs], ":", color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: format(value, "g")))
    ax.set_ylabel("ms per token")
    ax.set_title("Decode: one layer step (solid), attention alone (dotted)")
    ax.legend(fontsize=8)


def plot_bytes(ax, rows, contexts, kv_list, colors):
    for context, color in zip(contexts, colors):
        kvs = [k for k in kv_list if ("decode", k, context) in rows]
        ax.plot(kvs, [rows[("decode", k, context)]["kv_MiB"] for k in kvs], "o-", color=color,
                label="ctx %s" % tokens_label(context))
    per_token = {k: rows[key]["kvB_tok"] for key in rows for k in [key[1]]}
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: format(value, "g")))
    ax.set_ylabel("KV cache, MiB (whole context, fp32)")
    ax.set_title("KV cache size (%s KiB/token at kv_heads %d)"
                 % (format(per_token[max(per_token)] / 1024, "g"), max(per_token)))
    ax.legend(fontsize=8)


def plot_tradeoff(ax, rows, contexts, kv_list, colors, source_kv, q_heads):
    for context, color in zip(contexts, colors):
        base = rows.get(("decode", source_kv, context))
        kvs = [k for k in kv_list if ("decode", k, context) in rows]
        if base is None or not kvs:
            continue
        drift = [1.0 - rows[("decode", k, context)]["cosine"] for k in kvs]
        speed = [base["ms"] / rows[("decode", k, context)]["ms"] for k in kvs]
        ax.plot(drift, speed, "o-", color=color, label="ctx %s" % tokens_label(context))
        if context == contexts[-1]:
            for k, x, y in zip(kvs, drift, speed):
                ax.annotate(layout_name(k, source_kv, q_heads), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
    ax.set_xlabel("quality drift: 1 - cosine(y_pooled, y_source)")
    ax.set_ylabel("decode speed-up over kv_heads %d" % source_kv)
    ax.set_title("Speed against quality (mean-pooled KV heads)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def plot_prefill(ax, rows, kv_list):
    kvs = [k for k in kv_list if any(key[0] == "prefill" and key[1] == k for key in rows)]
    if not kvs:
        ax.set_visible(False)
        return
    length = next(key[2] for key in rows if key[0] == "prefill")
    values = [rows[("prefill", k, length)]["tok_s"] for k in kvs]
    ax.bar(range(len(kvs)), values, color="#4c72b0")
    ax.set_xticks(range(len(kvs)))
    ax.set_xticklabels([str(k) for k in kvs])
    ax.set_xlabel("kv_heads")
    ax.set_ylabel("tokens/s")
    ax.set_title("Causal prefill of %d tokens" % length)
    ax.grid(True, axis="y", alpha=0.3)


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: plot_heads.py results.json out_dir/")
    rows, context, repetitions = load(argv[1])
    out_dir = argv[2]
    os.makedirs(out_dir, exist_ok=True)

    kv_list = sorted({key[1] for key in rows}, reverse=True)
    contexts = sorted({key[2] for key in rows if key[0] == "decode"})
    shape = dict(item.split("=") for item in context.get("kvheads_shape", "").split() if "=" in item)
    q_heads = int(shape.get("q_heads", max(kv_list)))
    source_kv = int(shape.get("source_kv_heads", max(kv_list)))
    colors = plt.cm.viridis([0.15 + 0.7 * i / max(1, len(contexts) - 1) for i in range(len(contexts))])
    weights = context.get("kvheads_weights", "?")
    if weights == "synthetic":
        weights = "synthetic layer, kv_similarity %s" % context.get("kvheads_kv_similarity", "?")[:4]
    load_avg = context.get("load_avg")
    title = "kvheads compare_heads: d_model %s, %d query heads, head_dim %s (%s)" % (
        shape.get("d_model", "?"), q_heads, shape.get("head_dim", "?"), weights)
    machine = "%s x %.1f GHz" % (context.get("num_cpus", "?"), context.get("mhz_per_cpu", 0) / 1000.0)
    if load_avg:
        machine += ", load average %.1f" % load_avg[0]
    if repetitions > 1:
        machine += ", mean of %d runs" % repetitions

    panels = [
        ("decode_time.png", lambda ax: plot_decode(ax, rows, contexts, kv_list, colors), True),
        ("kv_bytes.png", lambda ax: plot_bytes(ax, rows, contexts, kv_list, colors), True),
        ("speed_vs_quality.png",
         lambda ax: plot_tradeoff(ax, rows, contexts, kv_list, colors, source_kv, q_heads), False),
        ("prefill.png", lambda ax: plot_prefill(ax, rows, kv_list), False),
    ]
    for filename, draw, kv_x in panels:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        draw(ax)
        if kv_x:
            kv_axis(ax, kv_list)
        fig.suptitle(title + "\n" + machine, fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, filename), dpi=90)
        plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6))
    for (filename, draw, kv_x), ax in zip(panels, axes.flat):
        draw(ax)
        if kv_x:
            kv_axis(ax, kv_list)
    fig.suptitle(title + "; " + machine, fontsize=10)
    fig.tight_layout()
    combined = os.path.join(out_dir, "compare_heads.png")
    fig.savefig(combined, dpi=80)
    plt.close(fig)
    print("plot_heads: wrote %d charts to %s (combined: %s)" % (len(panels) + 1, out_dir, combined))


if __name__ == "__main__":
    main(sys.argv)
