"""Is a gap between two rows of a quality table larger than its noise?

Both rows are measured on the same held-out rows, so the comparison is paired: per row, the difference of their
losses. A bootstrap over the rows (resampling them with replacement) gives an interval for the mean difference;
when it holds zero, the table cannot rank the two rows on that sample, however many digits it prints.
Cells record per-row sums (`kl_rows`, `nll_rows`; quality_common.measure) for this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DRAWS = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Gap:
    mean: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes zero: the sign of the gap holds on this sample."""
        return self.low > 0 or self.high < 0


def paired_gap(a: list[float], b: list[float], draws: int = DRAWS, seed: int = 0) -> Gap:
    """Mean of a - b over paired rows and its bootstrap interval at LEVEL (percentile method)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired rows differ in number: {len(a)} vs {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    picks = torch.randint(len(d), (draws, len(d)), generator=torch.Generator().manual_seed(seed))
    means = d[picks].mean(1)
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Gap(float(d.mean()), low, high)


def _best(cells: dict, names: list[str], key: str, p: str) -> str | None:
    """The row of `names` with the lowest perplexity at level `key` (None: no row measured there)."""
    have = [n for n in names if f"{p}perplexity" in cells.get(f"{n}/{key}", {})]
    return min(have, key=lambda n: cells[f"{n}/{key}"][f"{p}perplexity"], default=None)


def gap_line(
    cells: dict, key: str, label: str, evopress: list[str], baselines: list[str], p: str, seq_len: int
) -> str:
    """'<level>: <evopress row> vs <best baseline>: KL ... , perplexity ...' or why it cannot be said."""
    ours, theirs = _best(cells, evopress, key, p), _best(cells, baselines, key, p)
    if ours is None or theirs is None:
        return f"- {label}: not measured on both sides"
    a, b = cells[f"{ours}/{key}"], cells[f"{theirs}/{key}"]
    if f"{p}kl_rows" not in a or f"{p}kl_rows" not in b:
        return f"- {label}: {ours} vs {theirs}: per-row losses not recorded (measured before they were kept)"
    kl = paired_gap([v / seq_len for v in a[f"{p}kl_rows"]], [v / seq_len for v in b[f"{p}kl_rows"]])
    # per-row mean NLL differences: their mean is the log of the perplexity ratio (rows have equal length)
    nll = paired_gap(
        [v / (seq_len - 1) for v in a[f"{p}nll_rows"]], [v / (seq_len - 1) for v in b[f"{p}nll_rows"]]
    )

    def pct(x: float) -> str:
        return f"{100 * (math.exp(x) - 1):+.1f}%"

    return (
        f"- {label}: {ours} vs {theirs}: KL {kl.mean:+.4f} [{kl.low:+.4f}, {kl.high:+.4f}], "
        f"perplexity {pct(nll.mean)} [{pct(nll.low)}, {pct(nll.high)}]; "
        f"EvoPress KL {_verdict(kl)}, perplexity {_verdict(nll)}"
    )


def _verdict(gap: Gap) -> str:
    if not gap.resolved:
        return "within the noise"
    return "lower" if gap.high < 0 else "HIGHER"


def gap_lines(cells: dict, levels: list[tuple[str, str]], rows: list, info: dict) -> list[str]:
    """Per level, EvoPress's best row against the best other row (dense excluded), paired over the held-out rows."""
    p = f"{info['name']}_" if info["name"] else ""
    evopress = [r.cell for r in rows if r.label.startswith("evopress")]
    baselines = [r.cell for r in rows if not r.label.startswith("evopress") and r.cell != "dense"]
    if not evopress or not baselines:
        return []
    head = (
        f"EvoPress minus the best other row, paired over the {info['rows']} held-out rows "
        f"(mean and {LEVEL:.0%} bootstrap interval; negative: EvoPress lower):"
    )
    seq_len = info["seq_len"]
    return [head, *(gap_line(cells, key, label, evopress, baselines, p, seq_len) for key, label in levels)]
