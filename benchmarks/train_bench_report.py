"""``bench_train.py``'s comparisons of ours against naive at equal micro-batch, and its table."""

from benchmarks.train_engines import PHASES

ATTENTION = ("padded", "packed")


def _ratios(ours: dict, naive: dict) -> dict:
    row = {"tokens_per_s_ratio": ours["student_tokens_per_s"] / naive["student_tokens_per_s"]}
    for key in ("peak_memory_gib", "step_memory_gib", "loss_memory_gib"):
        if isinstance(ours.get(key), float) and isinstance(naive.get(key), float) and ours[key] > 0:
            row[key.replace("_gib", "_ratio_naive_over_ours")] = naive[key] / ours[key]
    return row


def comparisons(results: list) -> list:
    """ours vs naive at equal micro-batch: with the same attention layout, and ours packed vs naive
    padded (the reference's layout without flash-attn) when both layouts ran."""
    by_key = {(r["variant"], r.get("attention", "padded"), r["micro_batch_size"]): r for r in results}
    pairs = [(a, a) for a in ATTENTION] + [("packed", "padded")]
    out = []
    for micro_batch in sorted({r["micro_batch_size"] for r in results}):
        for ours_attention, naive_attention in pairs:
            ours = by_key.get(("ours", ours_attention, micro_batch))
            naive = by_key.get(("naive", naive_attention, micro_batch))
            if ours is None or naive is None:
                continue
            row = {"micro_batch_size": micro_batch, "ours_attention": ours_attention,
                   "naive_attention": naive_attention, "ours": ours["status"], "naive": naive["status"]}
            if ours["status"] == naive["status"] == "ok":
                row.update(_ratios(ours, naive))
            out.append(row)
    return out


def fmt(value, spec):
    if isinstance(value, str):  # "OOM"
        return value
    return "-" if value is None else format(value, spec)


def table(results: list) -> str:
    lines = [f"{'variant':<7} {'attention':<9} {'mb':>3} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU %':>6} "
             f"{'+attn %':>7} {'HFU %':>6} {'peak GiB':>9} {'step GiB':>9} {'loss GiB':>9} "
             f"{'teach ms':>9} {'s f+b ms':>9} {'opt ms':>8} {'host GiB':>9}"]
    for r in results:
        head = f"{r['variant']:<7} {r.get('attention', 'padded'):<9} {r['micro_batch_size']:>3}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']:>9}")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        mfu_attn = None if r.get("mfu_with_attention") is None else 100 * r["mfu_with_attention"]
        hfu = None if r.get("hfu") is None else 100 * r["hfu"]
        lines.append(
            f"{head} {1000 * r['step_seconds_median']:>9.1f} "
            f"{r['student_tokens_per_s']:>10.0f} {r['achieved_tflops']:>8.2f} {fmt(mfu, '6.1f'):>6} "
            f"{fmt(mfu_attn, '7.1f'):>7} {fmt(hfu, '6.1f'):>6} {fmt(r['peak_memory_gib'], '9.2f'):>9} "
            f"{fmt(r['step_memory_gib'], '9.3f'):>9} {fmt(r.get('loss_memory_gib'), '9.3f'):>9} "
            + " ".join(f"{1000 * r['phase_seconds_median'][name]:>{w}.1f}" for name, w in zip(PHASES, (9, 9, 8)))
            + f" {r['host_peak_rss_gib']:>9.2f}"
        )
    return "\n".join(lines)
