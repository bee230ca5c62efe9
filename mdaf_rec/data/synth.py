"""A synthetic Taobao-like CTR dataset in the canonical schema, with a known click probability.

World (all fully vectorised numpy, deterministic for a seed):

* ``categories`` with Zipf popularity, ``items`` assigned to categories (by category popularity)
  with Zipf popularity within them; item latent ``v_i = normalise(q_cat + noise)`` (dim 8), so
  items of one category are similar.
* each user has a bias ``b_u``, a latent ``p_u`` (near the mean latent of 3 favourite categories)
  and a behaviour stream in time: sessions (a new one with probability ``jump_prob`` per event)
  each stay in one category (a favourite with probability 0.7, else a popular one) and draw items
  by popularity. The first ``min_prior_events..max_history`` events of a stream happened before
  the data window (so a user's first row has that much history);
  the others are the impressions (rows), at strictly increasing timestamps over ``days`` days whose
  hour-of-day follows an evening-peaked activity curve. A row's target is its stream event; its
  history is the events before it (most recent last, at most ``max_history``).

Click model, ``p = sigmoid(bias + s_static + s_seq)``:

* ``s_static = b_u + b_i + affinity * p_u . q_cat + hour_effect * cos(2 pi (hour - 21) / 24)
  + weekend_effect * [Sat/Sun]`` (hour / day of week local to ``timezone``);
* ``s_seq = sequence_effect * (sum_l w_l cos(v_target, v_hist[-l]) / sum_l w_l - mean)`` with
  recency weights ``w_l = decay ** (l - 1)`` over the available history (0 if empty): the order
  of the history matters, the most recent items most;
* ``bias`` is solved so that the mean of ``p`` is ``ctr``. ``label ~ Bernoulli(p)``.

Neither a static-only model (no history) nor a sequence-only one (no user / time) can reach the
Bayes ceiling; ``meta.json`` records per split the Bayes AUC / logloss of ``click_prob`` and the
AUC of each part alone (defaults: Bayes AUC ~0.81, logloss ~0.47; static part alone ~0.745,
sequential part alone ~0.715). Splits are by local date from ``start_date``: the last
``test_days`` days are test, the ``val_days`` before them val, the rest train; rows are written
in time order (zstd, row groups of ``row_group_size``). Taobao scale (577,482 users, 335,164
items, 5,480 categories) works: 1M rows take ~11 s on one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Dict, Tuple, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdaf_rec.data import schema
from mdaf_rec.errors import UserError

logger = logging.getLogger(__name__)

# Extra columns written with ``write_parts``: the two logit parts (without the bias).
STATIC_LOGIT = "static_logit"
SEQUENCE_LOGIT = "sequence_logit"
LATENT_DIM = 8
NUM_FAVOURITES = 3
FAVOURITE_PROB = 0.7
PEAK_HOUR = 21
SECONDS_PER_DAY = 86400


class SynthParamsError(UserError, ValueError):
    """A generator parameter is out of range; the message names it as its command-line flag."""


@dataclass(frozen=True)
class SynthParams:
    """Generator parameters (all recorded in ``meta.json`` ``options``)."""

    rows: int = 200_000
    users: int = 4_000
    items: int = 10_000
    categories: int = 200
    days: int = 8
    val_days: int = 1
    test_days: int = 1
    start_date: str = "2017-11-25"
    timezone: str = "Asia/Shanghai"
    max_history: int = 50
    min_prior_events: int = 0
    ctr: float = 0.3
    item_zipf: float = 1.1
    category_zipf: float = 1.0
    jump_prob: float = 0.3
    user_bias: float = 0.6
    item_bias: float = 0.6
    affinity: float = 1.5
    hour_effect: float = 0.5
    weekend_effect: float = 0.3
    sequence_effect: float = 3.0
    decay: float = 0.7
    seed: int = 0
    row_group_size: int = 65536
    write_parts: bool = False


def generate(out_dir: Union[str, Path], **params: Any) -> Dict[str, Any]:
    """Generates a dataset into ``out_dir`` (``train/val/test.parquet`` + ``meta.json``).

    Args:
        out_dir: output folder (created).
        params: fields of :class:`SynthParams`.
    Returns:
        The meta dict written to ``meta.json``.
    """
    p = SynthParams(**params)
    _check(p)
    started = time.perf_counter()
    table, parts = _simulate(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = _split_by_time(table, p)
    train_days = p.days - p.val_days - p.test_days
    meta: Dict[str, Any] = {
        "format": "synth",
        "protocol": "synthetic Taobao-like impressions: the target is the next event of the user's behaviour "
        "stream, the history its previous events, label ~ Bernoulli(click_prob) (see mdaf_rec/data/synth.py)",
        "timezone": p.timezone,
        "split": f"by local date from {p.start_date}: train = first {train_days} days, val = next {p.val_days}, "
        f"test = last {p.test_days}",
        "rows": p.rows,
        "splits": {},
        "extra_sparse": [],
        "dense": [],
        "options": asdict(p),
    }
    for split, mask in splits.items():
        part = table.filter(mask)
        if not p.write_parts:
            part = part.drop_columns([STATIC_LOGIT, SEQUENCE_LOGIT])
        pq.write_table(part, out / f"{split}.parquet", row_group_size=p.row_group_size, compression="zstd")
        meta["splits"][split] = _split_stats(table, parts, np.asarray(mask))
    (out / schema.META_FILE).write_text(json.dumps(meta, indent=2))
    logger.info(
        "synth: %d rows in %.1fs -> %s (test Bayes AUC %.4f)",
        p.rows, time.perf_counter() - started, out, meta["splits"]["test"]["bayes_auc"],
    )
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--out`` and one ``--<param>`` option per :class:`SynthParams` field."""
    parser.add_argument("--out", required=True, help="output dataset folder")
    for name, default in asdict(SynthParams()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help="write the static/sequence logit columns")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"default {default}")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``mdaf-rec data synth`` command: generates the dataset, returns its meta."""
    params = {name: getattr(args, name) for name in asdict(SynthParams())}
    return generate(args.out, **params)


# --------------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------------


def _check(p: SynthParams) -> None:
    """Raises :class:`SynthParamsError` for the first parameter out of range."""

    def require(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise SynthParamsError(f"--{name.replace('_', '-')} {getattr(p, name)!r}: {message}")

    for name in ("rows", "users", "items", "categories", "max_history", "row_group_size"):
        require(getattr(p, name) >= 1, name, "must be >= 1")
    require(0 <= p.min_prior_events <= p.max_history, "min_prior_events",
            f"must be in [0, --max-history {p.max_history}]")
    require(p.items >= p.categories, "items", f"must be >= --categories {p.categories}")
    require(min(p.val_days, p.test_days) >= 1 and p.days - p.val_days - p.test_days >= 1, "days",
            f"must leave at least one day each of train, val and test (--val-days {p.val_days}, "
            f"--test-days {p.test_days})")
    require(0 < p.ctr < 1, "ctr", "must be in (0, 1)")
    require(0 < p.jump_prob <= 1, "jump_prob", "must be in (0, 1]")
    require(0 < p.decay <= 1, "decay", "must be in (0, 1]")
    require(p.seed >= 0, "seed", "must be >= 0")
    try:
        date.fromisoformat(p.start_date)
    except ValueError as e:
        require(False, "start_date", f"not a date YYYY-MM-DD ({e})")
    try:
        ZoneInfo(p.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        require(False, "timezone", "not an IANA time zone")


@dataclass(frozen=True)
class _World:
    item_category: np.ndarray  # [I] category of each item
    items_by_category: np.ndarray  # [I] item ids sorted by category
    item_cum_weight: np.ndarray  # [I] cumulative popularity in items_by_category order
    category_bounds: np.ndarray  # [C + 1] slice of items_by_category per category
    category_weight: np.ndarray  # [C] category popularity (sums to 1)
    item_latent: np.ndarray  # [I, d] unit vectors
    category_latent: np.ndarray  # [C, d]
    item_bias: np.ndarray  # [I]
    user_latent: np.ndarray  # [U, d]
    user_bias: np.ndarray  # [U]
    favourites: np.ndarray  # [U, NUM_FAVOURITES] favourite categories


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights over a random permutation of ``n`` ids: ``[n]`` summing to 1."""
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return (w / w.sum())[rng.permutation(n)]


def _world(p: SynthParams, rng: np.random.Generator) -> _World:
    d = LATENT_DIM
    category_weight = _zipf(p.categories, p.category_zipf, rng)
    item_category = np.concatenate(
        [rng.permutation(p.categories), rng.choice(p.categories, p.items - p.categories, p=category_weight)]
    )
    items_by_category = np.argsort(item_category, kind="stable")
    item_weight = _zipf(p.items, p.item_zipf, rng)
    category_latent = rng.standard_normal((p.categories, d))
    item_latent = category_latent[item_category] + 0.7 * rng.standard_normal((p.items, d))
    item_latent /= np.linalg.norm(item_latent, axis=1, keepdims=True)
    favourites = rng.choice(p.categories, (p.users, NUM_FAVOURITES), p=category_weight)
    user_latent = category_latent[favourites].mean(axis=1) + 0.5 * rng.standard_normal((p.users, d))
    return _World(
        item_category=item_category,
        items_by_category=items_by_category,
        item_cum_weight=np.cumsum(item_weight[items_by_category]),
        category_bounds=np.searchsorted(item_category[items_by_category], np.arange(p.categories + 1)),
        category_weight=category_weight,
        item_latent=item_latent.astype(np.float32),
        category_latent=category_latent / np.sqrt(d),
        item_bias=p.item_bias * rng.standard_normal(p.items),
        user_latent=user_latent / np.sqrt(d),
        user_bias=p.user_bias * rng.standard_normal(p.users),
        favourites=favourites,
    )


def _draw_items(world: _World, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of ``categories``, by popularity within the category (inverse CDF)."""
    cum = np.concatenate([[0.0], world.item_cum_weight])
    lo, hi = cum[world.category_bounds[categories]], cum[world.category_bounds[categories + 1]]
    pos = np.searchsorted(world.item_cum_weight, lo + rng.random(len(categories)) * (hi - lo), side="right")
    pos = np.clip(pos, world.category_bounds[categories], world.category_bounds[categories + 1] - 1)
    return world.items_by_category[pos]


def _timestamps(p: SynthParams, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` UTC seconds: uniform day, evening-peaked local hour, uniform second."""
    tz = ZoneInfo(p.timezone)
    start = datetime.fromisoformat(p.start_date)
    midnights = np.array(
        [int((start.replace(tzinfo=tz).timestamp())) + day * SECONDS_PER_DAY for day in range(p.days)], dtype=np.int64
    )
    hour_weight = 1.0 + 0.8 * np.cos(2 * np.pi * (np.arange(24) - PEAK_HOUR) / 24)
    hours = rng.choice(24, n, p=hour_weight / hour_weight.sum())
    return midnights[rng.integers(0, p.days, n)] + hours * 3600 + rng.integers(0, 3600, n)


def _local_time(ts: np.ndarray, timezone: str) -> Tuple[np.ndarray, np.ndarray]:
    """Local hour ``[n]`` and day of week ``[n]`` (Monday = 0) of UTC seconds."""
    local = pa.array(ts, pa.timestamp("s", tz=timezone))
    return pc.hour(local).to_numpy(), pc.day_of_week(local).to_numpy()


def _streams(
    p: SynthParams, world: _World, row_user: np.ndarray, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Behaviour streams of the users of ``row_user`` (sorted), events in time order.

    Returns:
        stream_items ``[T]``, row_pos ``[N]`` (each row's event in the stream), row_first ``[N]``
        (the stream position of its user's first event).
    """
    users, rows_per_user = np.unique(row_user, return_counts=True)
    before = rng.integers(p.min_prior_events, p.max_history + 1, len(users))
    length = before + rows_per_user
    first = np.concatenate([[0], np.cumsum(length)[:-1]])
    total = int(length.sum())
    event_user = np.repeat(users, length)
    new_session = rng.random(total) < p.jump_prob
    new_session[first] = True
    starts = np.flatnonzero(new_session)
    favourite = world.favourites[event_user[starts], rng.integers(0, NUM_FAVOURITES, len(starts))]
    popular = rng.choice(p.categories, len(starts), p=world.category_weight)
    session_category = np.where(rng.random(len(starts)) < FAVOURITE_PROB, favourite, popular)
    category = session_category[np.cumsum(new_session) - 1]
    stream_items = _draw_items(world, category, rng)
    user_first = np.repeat(first, rows_per_user)
    within = np.arange(len(row_user)) - np.repeat(np.cumsum(rows_per_user) - rows_per_user, rows_per_user)
    row_pos = user_first + np.repeat(before, rows_per_user) + within
    return stream_items, row_pos, user_first


def _sequence_logit(
    p: SynthParams, world: _World, stream_items: np.ndarray, row_pos: np.ndarray, history_length: np.ndarray
) -> np.ndarray:
    """Recency-weighted mean cosine of the target to its history, ``[N]`` (0 without history)."""
    target = world.item_latent[stream_items[row_pos]]
    total = np.zeros(len(row_pos))
    weight = np.zeros(len(row_pos))
    for lag in range(1, p.max_history + 1):
        valid = history_length >= lag
        if not valid.any():
            break
        w = p.decay ** (lag - 1)
        idx = np.flatnonzero(valid)
        sim = np.einsum("nd,nd->n", target[idx], world.item_latent[stream_items[row_pos[idx] - lag]])
        total[idx] += w * sim
        weight[idx] += w
    mean_sim = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    has_history = history_length > 0
    centre = mean_sim[has_history].mean() if has_history.any() else 0.0
    return p.sequence_effect * np.where(has_history, mean_sim - centre, 0.0)


def _solve_bias(logit: np.ndarray, ctr: float) -> float:
    """The ``b`` with ``mean(sigmoid(b + logit)) = ctr`` (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if _sigmoid(mid + logit).mean() < ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _simulate(p: SynthParams) -> Tuple[pa.Table, Dict[str, np.ndarray]]:
    """All rows in time order; returns the table and the ``static`` / ``sequence`` / ``prob`` arrays."""
    rng = np.random.default_rng(p.seed)
    world = _world(p, rng)
    activity = rng.lognormal(0.0, 1.0, p.users)
    row_user = np.sort(rng.choice(p.users, p.rows, p=activity / activity.sum()))
    ts = _timestamps(p, p.rows, rng)
    ts = _strictly_increasing_per_user(row_user, ts)
    stream_items, row_pos, row_first = _streams(p, world, row_user, rng)
    hist_start = np.maximum(row_first, row_pos - p.max_history)
    hist_len = row_pos - hist_start

    item = stream_items[row_pos]
    category = world.item_category[item]
    hour, dow = _local_time(ts, p.timezone)
    static = (
        world.user_bias[row_user]
        + world.item_bias[item]
        + p.affinity * np.einsum("nd,nd->n", world.user_latent[row_user], world.category_latent[category])
        + p.hour_effect * np.cos(2 * np.pi * (hour - PEAK_HOUR) / 24)
        + p.weekend_effect * (dow >= 5)
    )
    sequence = _sequence_logit(p, world, stream_items, row_pos, hist_len)
    prob = _sigmoid(_solve_bias(static + sequence, p.ctr) + static + sequence)
    label = (rng.random(p.rows) < prob).astype(np.int8)

    order = np.argsort(ts, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(hist_len[order])]).astype(np.int32)
    gather = np.repeat(hist_start[order] - offsets[:-1], hist_len[order]) + np.arange(offsets[-1])
    hist_items = stream_items[gather]
    table = pa.table(
        {
            schema.USER_ID: (row_user[order] + 1).astype(np.int64),
            schema.ITEM_ID: (item[order] + 1).astype(np.int64),
            schema.CATEGORY_ID: (category[order] + 1).astype(np.int64),
            schema.TIMESTAMP: ts[order],
            schema.LABEL: label[order],
            schema.ITEM_HISTORY: pa.ListArray.from_arrays(offsets, (hist_items + 1).astype(np.int64)),
            schema.CATEGORY_HISTORY: pa.ListArray.from_arrays(
                offsets, (world.item_category[hist_items] + 1).astype(np.int64)
            ),
            schema.CLICK_PROB: prob[order].astype(np.float32),
            STATIC_LOGIT: static[order].astype(np.float32),
            SEQUENCE_LOGIT: sequence[order].astype(np.float32),
        }
    )
    return table, {"static": static[order], "sequence": sequence[order], "prob": prob[order]}


def _strictly_increasing_per_user(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Sorts ``ts`` within each user (``user`` sorted) and bumps ties so they strictly increase."""
    order = np.lexsort((ts, user))
    ts = ts[order]
    k = np.arange(len(ts))
    offset = user.astype(np.int64) << 40  # keeps the running maximum within each user
    return np.maximum.accumulate(ts - k + offset) - offset + k


def _split_by_time(table: pa.Table, p: SynthParams) -> Dict[str, pa.Array]:
    tz = ZoneInfo(p.timezone)
    start = int(datetime.fromisoformat(p.start_date).replace(tzinfo=tz).timestamp())
    val_start = start + (p.days - p.val_days - p.test_days) * SECONDS_PER_DAY
    test_start = start + (p.days - p.test_days) * SECONDS_PER_DAY
    ts = table.column(schema.TIMESTAMP)
    return {
        "train": pc.less(ts, val_start),
        "val": pc.and_(pc.greater_equal(ts, val_start), pc.less(ts, test_start)),
        "test": pc.greater_equal(ts, test_start),
    }


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def _split_stats(table: pa.Table, parts: Dict[str, np.ndarray], mask: np.ndarray) -> Dict[str, Any]:
    # imported here: mdaf_rec.metrics imports torch (~190 MB resident), which `mdaf-rec data` of the other
    # formats (every converter module is imported to build the command line) must not carry into their conversions
    from mdaf_rec.metrics import auc_score, logloss_score

    labels = table.column(schema.LABEL).to_numpy()[mask]
    times = table.column(schema.TIMESTAMP).to_numpy()[mask]
    return {
        "rows": int(mask.sum()),
        "ctr": float(labels.mean()),
        "first_timestamp": int(times.min()),
        "last_timestamp": int(times.max()),
        "bayes_auc": auc_score(parts["prob"][mask], labels),
        "bayes_logloss": logloss_score(table.column(schema.CLICK_PROB).to_numpy()[mask], labels),
        "static_only_auc": auc_score(parts["static"][mask], labels),
        "sequence_only_auc": auc_score(parts["sequence"][mask], labels),
    }
