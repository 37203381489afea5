"""Pictures of the bench's JSON (`bench --plot FILE.png`): matplotlib, an optional extra
(`pip install 'sdsat-lsp[plot]'`; scripts/setup installs it)."""

from __future__ import annotations

from ..errors import SdsatError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SdsatError("--plot needs matplotlib: pip install 'sdsat-lsp[plot]' (scripts/setup installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(result: dict, path: str) -> None:
    """Tokens/s per mode (ours, then the peer's), and accepted drafts per verifying pass."""
    plt = _pyplot()
    names, speeds, accepted, colours = [], [], [], []
    for mode, entry in result["modes"].items():
        names.append(mode)
        speeds.append(entry["tokens_per_s"])
        accepted.append(entry.get("mean_accepted") or 0.0)
        colours.append("#999999" if mode.startswith("hf-") or mode.endswith("-eager") else "#3070b0")
    for peer, entries in result.get("peers", {}).items():
        for mode, entry in entries.items():
            names.append(f"{peer} {mode}")
            speeds.append(entry["tokens_per_s"])
            accepted.append(entry.get("mean_accepted") or 0.0)
            colours.append("#d06020")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.42 * len(names) + 1.6), sharey=True)
    rows = range(len(names))
    left.barh(rows, speeds, color=colours)
    left.set_yticks(list(rows), names)
    left.invert_yaxis()
    left.set_xlabel("tokens/s (greedy)")
    for row, value in zip(rows, speeds):
        left.text(value, row, f" {value:.0f}", va="center", fontsize=8)
    right.barh(rows, accepted, color=colours)
    right.set_xlabel("accepted drafts per verifying pass")
    title = (f"{str(result.get('model', '')).rstrip('/').split('/')[-1]}: {result.get('prompts', '?')} prompts x {result.get('max_new_tokens', '?')} "
             f"tokens, {result.get('device', '')}, {result.get('threads', '?')} threads, "
             f"compile={result.get('compile')}, identical={result.get('identical')}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_session(result: dict, path: str) -> None:
    """The editor session's request latencies with and without the KV cache."""
    plt = _pyplot()
    series = [(label, result.get(key) or []) for label, key in (("KV cache", "latencies_ms"),
                                                                 ("no cache", "nocache_latencies_ms"))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, values in series:
        if values:
            ordered = sorted(values)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=f"{label} (p50 "
                    f"{ordered[len(ordered) // 2]:.0f} ms)")
    ax.set_xscale("log")  # a long tail (requests that met a busy CPU) would squash the rest
    ax.set_xlabel("request latency, ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    compiled = (result.get("compiled") or {}).get("state", "?")
    ax.set_title(f"editor session: {result.get('requests', '?')} requests, compiled forward: {compiled}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
