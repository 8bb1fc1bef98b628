"""Words and numbers of the report: missing values as "-", plurals, ratios near 1, spreads, and whether a
difference of two test scores is within noise. Pure functions, no torch."""

from __future__ import annotations

import math
import statistics

NEAR_ONE = 0.05  # a ratio within ±5% of 1 reads "about as fast / about the teacher's size", not "1.0× faster"
Z95 = 1.959964  # two-sided 95% quantile of the normal distribution


def num(x) -> float | None:
    """x as a float when it is a finite number (not a bool), else None."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def fmt(x, spec: str, small: int | None = None) -> str:
    """format(x, spec), "-" when x is missing or not finite; with `small`, values under 10^-small keep 2 digits."""
    x = num(x)
    if x is None:
        return "-"
    tiny = small is not None and x != 0 and abs(x) < 10 ** -small
    return f"{x:.2g}" if tiny else format(x, spec)  # tiny values stay readable instead of 0.000


def fmt_spread(median, low, high, spec: str, small: int | None = None) -> str:
    """"median (min–max)"; the median alone when the range is not known."""
    if num(low) is None or num(high) is None:
        return fmt(median, spec, small)
    return f"{fmt(median, spec, small)} ({fmt(low, spec, small)}–{fmt(high, spec, small)})"


def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 test error", "2 test errors", "0 test errors"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def speed_phrase(speedup) -> str | None:
    """How fast a model runs against the teacher, from teacher latency / model latency."""
    sp = num(speedup)
    if sp is None or sp <= 0:
        return None
    if abs(sp - 1) <= NEAR_ONE:
        return f"runs about as fast as the teacher ({sp:.2f}×)"
    return f"runs {sp:.1f}× faster than the teacher" if sp > 1 else f"runs {1 / sp:.1f}× slower than the teacher"


def size_phrase(compression, alone: bool = False) -> str | None:
    """The model's size against the teacher's, from teacher parameters / model parameters: a phrase that
    follows "keeps 98% of the teacher's accuracy" or, with alone=True, a clause of its own ("has 1/10 of ...")."""
    k = num(compression)
    if k is None or k <= 0:
        return None
    if k == 1:
        return "is the same size as the teacher" if alone else "at the same size as the teacher"
    if abs(k - 1) <= NEAR_ONE:
        return f"{'is about' if alone else 'at about'} the teacher's size (compression {k:.2f}×)"
    if k > 1:
        share = f"1/{k:.0f}" if k >= 10 else f"1/{k:.1f}"
        return f"has {share} of the teacher's parameters" if alone else f"at {share} of its parameters"
    return f"{'has' if alone else 'with'} {1 / k:.1f}× the teacher's parameters"


def value_text(v) -> str:
    """A recipe value as a person writes it: 4.0 -> 4, True -> true, [32, 64] -> [32, 64]."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    return "-" if v is None else str(v)


# ----------------------------------------------------------------------------- noise
NOISE_RULE = (
    "Noise: with one seed, the band is a 95% interval on the difference of two accuracies measured on the same "
    "n test rows, 1.96·√(p1(1−p1)/n + p2(1−p2)/n). It treats the two models' errors as independent; on the same "
    "rows they are usually correlated, which makes the true band narrower, so this one is conservative (it says "
    "\"cannot tell apart\" more often than a paired test would). With several seeds, the band is the 95% "
    "t-interval of the mean of the paired per-seed differences. Other metrics (entity F1) have no such simple "
    "formula: their noise is not estimated from one seed.")


def accuracy_band(p1: float, n1: int, p2: float, n2: int) -> float:
    """Half-width of the 95% interval on p1 - p2 for accuracies on n1 and n2 rows, independent-samples normal
    approximation: 1.96·sqrt(p1(1-p1)/n1 + p2(1-p2)/n2). Conservative for two models scored on the same rows
    (positively correlated errors make the paired variance smaller)."""
    return Z95 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def seed_band(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """(mean of the paired differences a_i - b_i, half-width of their 95% t-interval); None under 2 pairs."""
    diffs = [x - y for x, y in zip(a, b) if num(x) is not None and num(y) is not None]
    if len(diffs) < 2:
        return None
    from scipy.stats import t  # lazy: only for runs that carry several seeds

    half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.fmean(diffs), half


def noise_sentence(label: str, metric: str, a: dict, b: dict, seeds: tuple[list, list] | None = None) -> str | None:
    """One sentence on whether model a's test score differs from model b's by more than noise.

    a and b: {"score": test score, "n": test rows}; `label` names b ("the network trained alone"). The band is
    the observed spread over seeds when `seeds` holds two paired lists of per-seed scores, else for accuracy
    `accuracy_band` on the test set; for other metrics the noise is said to be unknown. Inside the band: "this
    run cannot tell the two apart"."""
    pct = metric == "accuracy"
    unit = (lambda v: f"{v * 100:+.1f} points") if pct else (lambda v: f"{v:+.3g}")
    band_text = (lambda v: f"±{v * 100:.1f} points") if pct else (lambda v: f"±{v:.3g}")
    observed = seed_band(*seeds) if seeds else None
    if observed is not None:
        diff, band = observed
        where = f"of {len(seeds[0])} seeds (paired, {band_text(band)}, 95%)"
    else:
        sa, sb, na, nb = num(a.get("score")), num(b.get("score")), num(a.get("n")), num(b.get("n"))
        if sa is None or sb is None:
            return None
        diff = sa - sb
        if not pct:
            return (f"Against {label}, the difference is {unit(diff)} {metric.replace('_', ' ')}; its noise is not "
                    f"estimated (no simple formula for one seed; run several seeds to see it).")
        if not na or not nb:
            return f"Against {label}, the difference is {unit(diff)}; the noise is not estimated (test-set size not recorded)."
        band = accuracy_band(sa, int(na), sb, int(nb))
        rows = f"{int(na):,}" if na == nb else f"{int(na):,}/{int(nb):,}"
        where = f"of a {rows}-row test set ({band_text(band)}, 95%)"
    if band <= 0:  # both accuracies 0 or 100%, or identical per-seed differences: no spread to compare with
        return f"Against {label}, the difference is {unit(diff)}; its noise cannot be estimated (no spread)."
    if abs(diff) <= band:
        return f"Against {label}, the difference, {unit(diff)}, is within the noise {where}: this run cannot tell the two apart."
    return f"Against {label}, the difference, {unit(diff)}, is larger than the noise {where}."
