"""MovieLens -> canonical dataset: every rating is one row.

Reads ml-latest / ml-latest-small (``ratings.csv`` + ``movies.csv``) or ml-100k (``u.data`` +
``u.item``), detected from the files in ``--raw``. label = rating >= ``--threshold``; category = the
movie's first genre (:data:`GENRE_IDS`); history = the movies the user rated strictly earlier (and
their categories), most recent last; split by global time quantiles (80/10/10); time zone UTC.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    MISSING_ID,
    BadRows,
    ConversionError,
    Impressions,
    add_common_arguments,
    build_histories,
    cli_options,
    concat,
    lookup,
    parse_fractions,
    read_csv,
    sort_by_user_time,
    source_files,
    split_by_time_quantiles,
    stable_hash64,
    write_dataset,
)
from mdaf_rec.data.schema import CATEGORY_ID, ITEM_ID, LABEL, TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

# Stable category id per genre name (the MovieLens genre list); 0 is reserved for a rating whose
# movie is missing from the movies file. A genre name outside this table gets stable_hash64(name).
GENRE_IDS: Dict[str, int] = {
    name: i + 1
    for i, name in enumerate((
        "(no genres listed)", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
        "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery",
        "Romance", "Sci-Fi", "Thriller", "War", "Western",
    ))
}
# ml-100k's 19 genre flag columns of u.item, in file order, with their ml-latest names.
ML100K_GENRES: Tuple[str, ...] = (
    "(no genres listed)", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
_NO_GENRE = "(no genres listed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``movielens`` options."""
    add_common_arguments(
        parser, raw_help="folder with ratings.csv + movies.csv (ml-latest*) or u.data + u.item (ml-100k)",
        timezone="UTC",
    )
    parser.add_argument("--threshold", type=float, default=4.0, help="label = rating >= this (default 4)")
    parser.add_argument(
        "--split", type=parse_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
        help="fractions of the global time quantile split (default 0.8,0.1,0.1)",
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    bad = BadRows(args.on_bad_row)
    raw: Path = args.raw
    if (raw / "ratings.csv").is_file():
        ratings_path, movies_path = raw / "ratings.csv", raw / "movies.csv"
        user, movie, rating, ts = _read_latest_ratings(ratings_path, bad)
        movie_keys, movie_categories = _read_latest_movies(movies_path, bad)
    elif (raw / "u.data").is_file():
        ratings_path, movies_path = raw / "u.data", raw / "u.item"
        user, movie, rating, ts = _read_100k_ratings(ratings_path, bad)
        movie_keys, movie_categories = _read_100k_movies(movies_path, bad)
    else:
        raise ConversionError(f"{raw}: neither ratings.csv (ml-latest) nor u.data (ml-100k) found")
    category, found = lookup(movie_keys, movie_categories, movie, MISSING_ID)
    columns = {
        USER_ID: user, ITEM_ID: movie, CATEGORY_ID: category, TIMESTAMP: ts,
        LABEL: (rating >= args.threshold).astype(np.int8),
    }
    sort_by_user_time(columns)
    logger.info("%d ratings of %d users; building histories", len(ts), len(np.unique(user)))
    offsets, (items, categories) = build_histories(
        columns[USER_ID], columns[TIMESTAMP], [columns[ITEM_ID], columns[CATEGORY_ID]],
        columns[USER_ID], columns[TIMESTAMP], args.max_history,
    )
    split, rule = split_by_time_quantiles(columns[TIMESTAMP], args.split)
    data = Impressions(columns, offsets, items, categories, split)
    meta = {
        "format": "movielens",
        "protocol": (
            f"one row per rating; label = rating >= {args.threshold}; category = first genre; history = "
            f"the user's last {args.max_history} rated movies with timestamp strictly earlier, most recent last"
        ),
        "timezone": args.tz,
        "source": source_files([ratings_path, movies_path]),
        "split": rule,
        "category_ids": GENRE_IDS,
        "filled": {"ratings of movies missing from the movies file (category 0)": int((~found).sum())},
        "options": cli_options(args),
    }
    return write_dataset(args.out, data, extra_sparse=[], dense=[], meta=meta, bad=bad)


def _read_ratings(path: Path, bad: BadRows, columns: List[str], **csv: Any) -> List[np.ndarray]:
    """(user, movie, rating, timestamp) arrays of a ratings file with these ``columns``."""
    user_col, movie_col, rating_col, ts_col = columns
    parts = []
    for block in read_csv(path, columns, bad, **csv):
        arrays = (block.ids(user_col), block.ids(movie_col), block.floats(rating_col), block.ids(ts_col))
        parts.append(block.rows(*arrays))
    if not parts:
        raise ConversionError(f"{path}: no ratings")
    return concat(parts)


def _read_latest_ratings(path: Path, bad: BadRows) -> List[np.ndarray]:
    return _read_ratings(path, bad, ["userId", "movieId", "rating", "timestamp"])


def _read_100k_ratings(path: Path, bad: BadRows) -> List[np.ndarray]:
    names = ["user_id", "item_id", "rating", "timestamp"]
    return _read_ratings(path, bad, names, names=names, delimiter="\t", quoting=False)


def _genre_ids(names: pa.Array) -> np.ndarray:
    """Category id per genre name (:data:`GENRE_IDS`, else stable_hash64)."""
    encoded = pc.dictionary_encode(names)
    uniques = encoded.dictionary
    ids = stable_hash64(uniques)
    for i, name in enumerate(uniques.to_pylist()):
        ids[i] = GENRE_IDS.get(name, ids[i])
    return ids[encoded.indices.to_numpy()]


def _unique_movies(keys: np.ndarray, categories: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted distinct movie ids and their categories (a duplicated movie keeps its first line)."""
    uniq, first = np.unique(keys, return_index=True)
    return uniq, categories[first]


def _read_latest_movies(path: Path, bad: BadRows) -> Tuple[np.ndarray, np.ndarray]:
    parts = []
    for block in read_csv(path, ["movieId", "genres"], bad):
        movie = block.ids("movieId")
        first = pc.list_element(pc.split_pattern(block.strings("genres"), "|"), 0)
        first = pc.if_else(pc.equal(first, ""), _NO_GENRE, first)
        parts.append(block.rows(movie, _genre_ids(first)))
    return _unique_movies(*concat(parts))


def _read_100k_movies(path: Path, bad: BadRows) -> Tuple[np.ndarray, np.ndarray]:
    flags = [f"genre_{i}" for i in range(len(ML100K_GENRES))]
    names = ["movie_id", "title", "release_date", "video_release_date", "url", *flags]
    parts = []
    csv = dict(names=names, delimiter="|", encoding="latin-1", quoting=False)
    for block in read_csv(path, ["movie_id", *flags], bad, **csv):
        movie = block.ids("movie_id")
        matrix = np.stack([block.binary(f) for f in flags], axis=1)
        first = np.where(matrix.any(axis=1), matrix.argmax(axis=1), 0)
        genre_ids = np.array([GENRE_IDS[g] for g in ML100K_GENRES], dtype=np.int64)
        parts.append(block.rows(movie, genre_ids[first]))
    return _unique_movies(*concat(parts))
