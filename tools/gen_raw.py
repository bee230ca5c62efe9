"""Generates raw files in the exact formats of the public Taobao logs and of MovieLens, with Zipf-distributed ids.

Three data sets, written block by block (memory stays flat at any size):

* ``behavior``: ``UserBehavior.csv`` (Tianchi 649): header-less ``user_id,item_id,category_id,behavior,timestamp``,
  9 days from 2017-11-25 (Asia/Shanghai), behaviors pv / cart / fav / buy at the real mix (89.6 / 5.5 / 2.9 /
  2.0 %); about 35 bytes per row like the real 100M-row, 3.5 GB file.
* ``ad``: the Alimama folder (Tianchi 56): ``raw_sample.csv`` (``user,time_stamp,adgroup_id,pid,nonclk,clk``,
  8 days from 2017-05-06, CTR about 5 %), ``ad_feature.csv`` (``adgroup_id,cate_id,campaign_id,customer,brand,
  price``, brand ``NULL`` for about 30 % of ads), ``user_profile.csv`` (the real header, trailing space
  included; blank ``pvalue_level`` / ``new_user_class_level`` codes) and, with ``--behavior-rows``,
  ``behavior_log.csv`` (``user,time_stamp,btag,cate,brand``, the 22 days up to the last impression day).
* ``movielens``: ``ratings.csv`` (``userId,movieId,rating,timestamp``; ratings 0.5-5.0 in half stars at
  ml-25m's mix, timestamps 1995-2019) and ``movies.csv`` (``movieId,title,genres``: titles with a year,
  every tenth quoted with a comma as in ``"American President, The (1995)"``, 1-3 of the 20 genres
  ``|``-joined, every 97th ``(no genres listed)``); at ml-25m's size (25M ratings of 163k users on 62k movies)
  about 27 and 40 bytes per row (ml-25m: 27 and 49).

Users, items, ads, categories and brands are drawn from bounded power laws (Zipf; a few items take many rows,
as in the real logs) and scattered over the id space by a fixed permutation; an item's category and
an ad's category / brand are fixed functions of the id, so the side tables agree with the logs. Rows within a
block are sorted by user and time (the real files are grouped by user). Same ``--seed``, same bytes.

Usage::

    python tools/gen_raw.py behavior --rows 1000000 --out /tmp/ub          # /tmp/ub/UserBehavior.csv
    python tools/gen_raw.py ad --rows 1000000 --behavior-rows 4000000 --out /tmp/ad
    python tools/gen_raw.py movielens --rows 1000000 --out /tmp/ml   # /tmp/ml/ratings.csv, movies.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

BLOCK_ROWS = 1 << 20
BEHAVIORS = ("pv", "cart", "fav", "buy")
BEHAVIOR_MIX = (0.896, 0.055, 0.029, 0.020)
BEHAVIOR_T0 = 1511539200  # 2017-11-25 00:00 Asia/Shanghai
AD_T0 = 1494000000  # 2017-05-06 00:00 Asia/Shanghai
DAY = 86_400
# Power-law exponents: user activity is flatter than item popularity (the busiest of 1M users has ~0.04 % of
# the rows, the most popular of 4M items ~1 %).
USER_EXPONENT = 0.5
ITEM_EXPONENT = 0.9
PIDS = ("430548_1007", "430539_1007")
# ml-25m: share of each rating 0.5, 1.0, ..., 5.0
RATINGS = ("0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0")
RATING_MIX = (0.016, 0.031, 0.016, 0.066, 0.050, 0.196, 0.126, 0.266, 0.085, 0.148)
RATING_T0, RATING_T1 = 789_652_009, 1_574_327_703  # ml-25m's first and last timestamps (1995-01-09, 2019-11-21)
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
          "(no genres listed)")


def zipf_ids(rng: np.random.Generator, n: int, size: int, scatter: int, exponent: float) -> np.ndarray:
    """``size`` ids in ``[1, n]``: rank r (1-based) drawn with probability proportional to ``r ** -exponent``
    (``0 < exponent < 1``, inverse CDF of the continuous power law), then scattered over the id space by the
    multiplicative permutation ``rank * scatter mod n`` (``scatter`` coprime with ``n``)."""
    a = 1.0 - exponent
    rank = np.floor((1.0 + rng.random(size) * ((n + 1) ** a - 1.0)) ** (1.0 / a)).astype(np.int64) - 1
    return (np.minimum(rank, n - 1) * scatter) % n + 1


def coprime(n: int, start: int) -> int:
    """The first integer >= ``start`` coprime with ``n``."""
    value = start
    while np.gcd(value, n) != 1:
        value += 1
    return value


def category_of(ids: np.ndarray, n_categories: int) -> np.ndarray:
    """A fixed category per id, itself roughly Zipf-distributed over ``[1, n_categories]``."""
    u = ((ids * 2654435761) % 1000003) / 1000003.0
    rank = np.floor(np.exp(u * np.log(n_categories + 1))).astype(np.int64) - 1
    return (rank * coprime(n_categories, 7919)) % n_categories + 1


def write_csv(path: Path, blocks: Iterator[Dict[str, pa.Array]], header: str | None) -> int:
    """Writes ``blocks`` as unquoted CSV after ``header`` (``None``: no header line); returns the rows written."""
    rows = 0
    with open(path, "wb") as f:
        if header is not None:
            f.write((header + "\n").encode())
        for columns in blocks:
            table = pa.table(columns)
            pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))
            rows += table.num_rows
    return rows


def sorted_block(columns: Dict[str, np.ndarray], user: str, time: str) -> Dict[str, np.ndarray]:
    order = np.lexsort((columns[time], columns[user]))
    return {name: values[order] for name, values in columns.items()}


def behavior_blocks(rows: int, seed: int, users: int, items: int, categories: int) -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed)
    user_scatter, item_scatter = coprime(users, 104729), coprime(items, 1299709)
    for start in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - start)
        item = zipf_ids(rng, items, n, item_scatter, ITEM_EXPONENT)
        block = sorted_block({
            "user_id": zipf_ids(rng, users, n, user_scatter, USER_EXPONENT),
            "item_id": item,
            "category_id": category_of(item, categories),
            "behavior": rng.choice(len(BEHAVIORS), n, p=BEHAVIOR_MIX),
            "timestamp": BEHAVIOR_T0 + rng.integers(0, 9 * DAY, n),
        }, "user_id", "timestamp")
        block["behavior"] = pa.DictionaryArray.from_arrays(block["behavior"].astype(np.int32), BEHAVIORS) \
            .cast(pa.string())
        yield block


def impression_blocks(rows: int, seed: int, users: int, ads: int) -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed)
    user_scatter, ad_scatter = coprime(users, 104729), coprime(ads, 1299709)
    for start in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - start)
        clk = (rng.random(n) < 0.05).astype(np.int64)
        block = sorted_block({
            "user": zipf_ids(rng, users, n, user_scatter, USER_EXPONENT),
            "time_stamp": AD_T0 + rng.integers(0, 8 * DAY, n),
            "adgroup_id": zipf_ids(rng, ads, n, ad_scatter, ITEM_EXPONENT),
            "pid": rng.integers(0, 2, n),
            "nonclk": 1 - clk,
            "clk": clk,
        }, "user", "time_stamp")
        block["pid"] = pa.DictionaryArray.from_arrays(block["pid"].astype(np.int32), PIDS).cast(pa.string())
        yield block


def ad_feature_blocks(ads: int, categories: int, brands: int, seed: int) -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed + 1)
    for start in range(1, ads + 1, BLOCK_ROWS):
        ad = np.arange(start, min(start + BLOCK_ROWS, ads + 1), dtype=np.int64)
        brand = pa.array(ad_brand(ad, brands)).cast(pa.string())
        no_brand = pa.array(ad % 10 < 3)
        yield {
            "adgroup_id": ad,
            "cate_id": category_of(ad, categories),
            "campaign_id": (ad * 7919) % 423436 + 1,
            "customer": (ad * 104729) % 255875 + 1,
            "brand": pc.if_else(no_brand, "NULL", brand),
            "price": np.round(np.exp(rng.normal(4.0, 1.5, len(ad))), 2),
        }


def ad_brand(ad: np.ndarray, brands: int) -> np.ndarray:
    return category_of(ad * 31 + 17, brands)


def profile_blocks(users: int, seed: int) -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed + 2)
    for start in range(1, users + 1, BLOCK_ROWS):
        user = np.arange(start, min(start + BLOCK_ROWS, users + 1), dtype=np.int64)
        n = len(user)

        def optional(values: np.ndarray) -> pa.Array:
            return pc.if_else(pa.array(rng.random(n) < 0.3), "", pa.array(values).cast(pa.string()))

        yield {
            "userid": user, "cms_segid": rng.integers(0, 97, n), "cms_group_id": rng.integers(0, 13, n),
            "final_gender_code": rng.integers(1, 3, n), "age_level": rng.integers(0, 7, n),
            "pvalue_level": optional(rng.integers(1, 4, n)), "shopping_level": rng.integers(1, 4, n),
            "occupation": rng.integers(0, 2, n), "new_user_class_level ": optional(rng.integers(1, 5, n)),
        }


def behavior_log_blocks(rows: int, seed: int, users: int, categories: int, brands: int) \
        -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed + 3)
    user_scatter = coprime(users, 104729)
    for start in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - start)
        thing = zipf_ids(rng, 10 * users, n, coprime(10 * users, 15485863), ITEM_EXPONENT)
        block = sorted_block({
            "user": zipf_ids(rng, users, n, user_scatter, USER_EXPONENT),
            "time_stamp": AD_T0 - 14 * DAY + rng.integers(0, 22 * DAY, n),
            "btag": rng.choice(len(BEHAVIORS), n, p=BEHAVIOR_MIX),
            "cate": category_of(thing, categories),
            "brand": ad_brand(thing, brands),
        }, "user", "time_stamp")
        block["btag"] = pa.DictionaryArray.from_arrays(block["btag"].astype(np.int32), BEHAVIORS).cast(pa.string())
        yield block


def rating_blocks(rows: int, seed: int, users: int, movies: int) -> Iterator[Dict[str, pa.Array]]:
    rng = np.random.default_rng(seed + 4)
    user_scatter, movie_scatter = coprime(users, 104729), coprime(movies, 1299709)
    for start in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - start)
        block = sorted_block({
            "userId": zipf_ids(rng, users, n, user_scatter, USER_EXPONENT),
            "movieId": zipf_ids(rng, movies, n, movie_scatter, ITEM_EXPONENT),
            "rating": rng.choice(len(RATINGS), n, p=RATING_MIX),
            "timestamp": rng.integers(RATING_T0, RATING_T1 + 1, n),
        }, "userId", "timestamp")
        block["rating"] = pa.DictionaryArray.from_arrays(block["rating"].astype(np.int32), RATINGS).cast(pa.string())
        yield block


def write_movies(path: Path, movies: int, seed: int) -> int:
    """Writes ``movies.csv`` (small: one line per movie, built in Python; titles with a comma quoted, which
    pyarrow's CSV writer cannot do for some values only); returns the rows written."""
    rng = np.random.default_rng(seed + 5)
    genres = np.array(GENRES[:-1])
    with open(path, "w", encoding="utf8", newline="\n") as f:
        f.write("movieId,title,genres\n")
        for movie in range(1, movies + 1):
            year = int(rng.integers(1902, 2020))
            title = f'"Movie {movie}, The ({year})"' if movie % 10 == 0 else f"Movie {movie} ({year})"
            names = GENRES[-1] if movie % 97 == 0 else "|".join(rng.choice(genres, int(rng.integers(1, 4))))
            f.write(f"{movie},{title},{names}\n")
    return movies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("behavior", "ad", "movielens"))
    parser.add_argument("--rows", type=int, required=True,
                        help="UserBehavior rows, raw_sample.csv impressions, or ratings.csv ratings")
    parser.add_argument("--behavior-rows", type=int, default=0, help="ad: behavior_log.csv rows (0: no file)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=None, help="id space (default: scaled like the real data)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "behavior":
        # real: 100M rows, 987,994 users, 4,162,024 items, 9,439 categories
        users = args.users or max(100, args.rows // 100)
        items = max(1000, args.rows // 24)
        n = write_csv(args.out / "UserBehavior.csv", behavior_blocks(args.rows, args.seed, users, items, 9439), None)
        print(f"{args.out / 'UserBehavior.csv'}: {n} rows")
        return 0
    if args.dataset == "movielens":
        # ml-25m: 25,000,095 ratings, 162,541 users, 62,423 movies
        users = args.users or max(100, args.rows // 154)
        movies = max(100, args.rows // 400)
        n = write_csv(args.out / "ratings.csv", rating_blocks(args.rows, args.seed, users, movies),
                      "userId,movieId,rating,timestamp")
        print(f"{args.out / 'ratings.csv'}: {n} rows")
        n = write_movies(args.out / "movies.csv", movies, args.seed)
        print(f"{args.out / 'movies.csv'}: {n} rows")
        return 0
    # real: 26.6M impressions, 1,141,729 users, 846,811 ads, 6,769 categories, 99,815 brands
    users = args.users or max(100, args.rows // 23)
    ads = max(100, args.rows // 31)
    categories, brands = 6769, 99815
    files = {
        "raw_sample.csv": (impression_blocks(args.rows, args.seed, users, ads), "user,time_stamp,adgroup_id,pid,nonclk,clk"),
        "ad_feature.csv": (ad_feature_blocks(ads, categories, brands, args.seed),
                           "adgroup_id,cate_id,campaign_id,customer,brand,price"),
        "user_profile.csv": (profile_blocks(users, args.seed),
                             "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
                             "shopping_level,occupation,new_user_class_level "),
    }
    if args.behavior_rows:
        files["behavior_log.csv"] = (behavior_log_blocks(args.behavior_rows, args.seed, users, categories, brands),
                                     "user,time_stamp,btag,cate,brand")
    for name, (blocks, header) in files.items():
        n = write_csv(args.out / name, blocks, header)
        print(f"{args.out / name}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
