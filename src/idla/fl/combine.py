"""One round's usable updates → one aggregate: the robust center, the trust scores, then the
configured aggregator (``StrategyConfig.aggregator``). ``FedStrategy`` calls it after screening
and applies the server optimizer to what it returns; the math is ``idla.fl.aggregate``'s.

The aggregators:

- ``fedavg``: the sample-weighted mean (McMahan et al. 2017).
- ``median``, ``trimmed``, ``krum``, ``multikrum``: the classic robust rules (Yin et al. 2018;
  Blanchard et al. 2017), told the attackers' share (``trim_fraction``, ``num_malicious``).
- ``trust``: samples × trust (``idla.fl.trust``, a memory of each client's outlier rounds),
  this round's outliers at weight 0.
- ``cclip``: centered clipping (Karimireddy et al. 2021) from the coordinate median with the
  radius the round sets itself (the median distance of the updates to that median).
- ``trustclip``: the two together. The updates that are not outliers this round go into
  centered clipping weighted by their trust, the radius taken from them: the trust memory drops
  the clients that stand out (far away or pointing backwards, now and in earlier rounds), and
  clipping bounds what each of the rest can do to the aggregate (τ/K per iteration) however
  it placed itself under the outlier threshold. Clients count by trust, not by samples: a
  sample count is the client's own claim, and colluders would inflate it.

Nothing here is told which attack runs or its parameters; only ``trimmed`` and the Krum rules
are told how many attackers to expect. Cost: O(K·P·log K) for the median and the scores, plus
the aggregator's (O(L·K·P) for the clipping rules, O(K²·P) for Krum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from idla.fl.aggregate import (
    NDArrays,
    centered_clipping,
    clipping_radius,
    coordinate_median,
    krum,
    trimmed_mean,
    weighted_mean,
)
from idla.fl.strategy_config import StrategyConfig
from idla.fl.trust import TrustTracker, score_updates


def combine_updates(
    config: StrategyConfig,
    reference: Sequence[np.ndarray],
    arrays: Sequence[Sequence[np.ndarray]],
    client_ids: Sequence[int],
    samples: Sequence[float],
    tracker: TrustTracker,
) -> tuple[NDArrays, list[int]]:
    """The aggregate of ``arrays`` (new weights, one list per client) and this round's outliers.

    Every aggregator updates ``tracker`` (trust is reported whichever rule combines).
    ``samples`` are the FedAvg weights (sample counts × the selection's weight scales).
    """
    center = coordinate_median(arrays)
    scores = score_updates(arrays, center, reference)
    flags = tracker.update(client_ids, scores)
    outliers = [c for c, flag in zip(client_ids, flags, strict=True) if flag]
    count = len(arrays)
    malicious = config.num_malicious or max(0, (count - 3) // 2)
    aggregator = config.aggregator
    if aggregator == "fedavg":
        return weighted_mean(arrays, samples), outliers
    if aggregator == "median":
        return center, outliers
    if aggregator == "trimmed":
        return trimmed_mean(arrays, config.trim_fraction), outliers
    if aggregator == "krum":
        return krum(arrays, malicious)[0], outliers
    if aggregator == "multikrum":
        selected = config.multikrum_selected or max(1, count - malicious)
        return krum(arrays, malicious, min(selected, count), samples)[0], outliers
    if aggregator == "cclip":
        radius = clipping_radius(arrays, center)
        return centered_clipping(arrays, center, radius, config.clip_iterations), outliers
    trust = [tracker.trust(c) for c in client_ids]
    if aggregator == "trustclip":
        keep = [i for i, flag in enumerate(flags) if not flag and trust[i] > 0]
        if not keep:
            return center, outliers
        kept = [arrays[i] for i in keep]
        radius = clipping_radius(kept, center)
        aggregate = centered_clipping(kept, center, radius, config.clip_iterations,
                                      [trust[i] for i in keep])
        return aggregate, outliers
    exclude = config.trust_exclude_outliers
    weights = [n * t * (0.0 if flag and exclude else 1.0)
               for n, t, flag in zip(samples, trust, flags, strict=True)]
    return (weighted_mean(arrays, weights) if sum(weights) > 0 else center), outliers
