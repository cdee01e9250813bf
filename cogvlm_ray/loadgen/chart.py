"""PNG chart of a sweep: latency vs load and throughput vs load (matplotlib, imported lazily)."""

from __future__ import annotations

import os


def write_chart(runs: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Draw two panels from the `runs` of a benchmark JSON.

    Each run is `{"concurrency": int | None, "request_rate": float | None, "summary": {...}}`;
    the x axis is the request rate if the sweep varied it, else the concurrency.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to chart")
    by_rate = runs[0].get("request_rate") is not None
    xlabel = "request rate (req/s)" if by_rate else "concurrency"
    xs = [run["request_rate"] if by_rate else run["concurrency"] for run in runs]

    def series(metric: str, key: str) -> list[float]:
        values = [run["summary"][metric][key] for run in runs]
        return [v if v is not None else float("nan") for v in values]

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, name in (("ttft_ms", "TTFT"), ("e2e_ms", "e2e"), ("itl_ms", "ITL")):
        for key, style in (("p50", "-o"), ("p99", "--x")):
            lat.plot(xs, series(metric, key), style, label=f"{name} {key}")
    lat.set_xlabel(xlabel)
    lat.set_ylabel("latency (ms)")
    lat.set_yscale("log")
    lat.set_title("latency")
    lat.legend(fontsize=8)
    lat.grid(True, alpha=0.3)

    thr.plot(xs, [run["summary"]["output_token_throughput"] for run in runs], "-o", label="output tok/s")
    thr.set_xlabel(xlabel)
    thr.set_ylabel("output tokens/s")
    thr.set_title("throughput")
    thr.grid(True, alpha=0.3)
    req = thr.twinx()
    req.plot(
        xs, [run["summary"]["request_throughput"] for run in runs], "--s", color="tab:orange", label="req/s"
    )
    req.set_ylabel("requests/s")
    lines = thr.get_legend_handles_labels()[0] + req.get_legend_handles_labels()[0]
    thr.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")

    if title:
        fig.suptitle(title, fontsize=10)
    if not by_rate:
        for axis in (lat, thr):
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
