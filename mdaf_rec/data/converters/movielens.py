"""MovieLens -> canonical dataset: every rating is one row.

Reads ml-latest / ml-latest-small (``ratings.csv`` + ``movies.csv``) or ml-100k (``u.data`` +
``u.item``), detected from the files in ``--raw``. label = rating >= ``--threshold``; category = the
movie's first genre (:data:`GENRE_IDS`); history = the movies the user rated strictly earlier (and
their categories), most recent last; split by global time quantiles (80/10/10); time zone UTC.
Joins, histories and the split run out of core as SQL (:mod:`.engine`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    MISSING_ID,
    BadRows,
    ConversionError,
    add_common_arguments,
    cli_options,
    parse_fractions,
    read_csv,
    source_files,
    stable_hash64,
)
from mdaf_rec.data.converters.engine import (
    SEQ,
    add_engine_arguments,
    add_histories,
    open_engine,
    time_quantile_split,
    write_dataset,
)
from mdaf_rec.data.schema import CATEGORY_HISTORY, CATEGORY_ID, ITEM_HISTORY, ITEM_ID, LABEL, TIMESTAMP, USER_ID

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
    add_engine_arguments(parser)
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
        read_ratings, read_movies = _read_latest_ratings, _read_latest_movies
    elif (raw / "u.data").is_file():
        ratings_path, movies_path = raw / "u.data", raw / "u.item"
        read_ratings, read_movies = _read_100k_ratings, _read_100k_movies
    else:
        raise ConversionError(f"{raw}: neither ratings.csv (ml-latest) nor u.data (ml-100k) found")
    with open_engine(args) as engine:
        if not engine.stage("ratings", read_ratings(ratings_path, bad)):
            raise ConversionError(f"{ratings_path}: no ratings")
        if not engine.stage("movies", read_movies(movies_path, bad)):
            raise ConversionError(f"{movies_path}: no movies")
        movies = f"(SELECT {ITEM_ID}, min_by({CATEGORY_ID}, {SEQ}) AS {CATEGORY_ID} FROM movies GROUP BY {ITEM_ID})"
        engine.create(
            "events", f"SELECT r.{SEQ}, {USER_ID}, r.{ITEM_ID}, "
            f"coalesce(m.{CATEGORY_ID}, {MISSING_ID}) AS {CATEGORY_ID}, {TIMESTAMP}, "
            f"(rating >= {float(args.threshold)!r}::DOUBLE)::TINYINT AS {LABEL}, m.{ITEM_ID} IS NULL AS missing "
            f"FROM ratings r LEFT JOIN {movies} m ON r.{ITEM_ID} = m.{ITEM_ID}"
        )
        n, missing, users = engine.one(f"SELECT count(*), count_if(missing), count(DISTINCT {USER_ID}) FROM events")
        logger.info("%d ratings of %d users; building histories", n, users)
        split, rule = time_quantile_split(engine, "events", args.split)
        add_histories(engine, "rows", "events", [("events", {ITEM_HISTORY: ITEM_ID, CATEGORY_HISTORY: CATEGORY_ID})],
                      args.max_history, extra={"split": split})
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
            "filled": {"ratings of movies missing from the movies file (category 0)": int(missing)},
            "options": cli_options(args),
        }
        return write_dataset(engine, args.out, "rows", order_by=f"{USER_ID}, {TIMESTAMP}, {SEQ}", extra_sparse=[],
                             dense=[], meta=meta, bad=bad)


def _read_ratings(path: Path, bad: BadRows, columns: List[str], **csv: Any) -> Iterator[Dict[str, np.ndarray]]:
    """Blocks of (user, movie, rating, timestamp) of a ratings file with these ``columns``."""
    user_col, movie_col, rating_col, ts_col = columns
    for block in read_csv(path, columns, bad, **csv):
        arrays = (block.ids(user_col), block.ids(movie_col), block.floats(rating_col), block.ids(ts_col))
        yield dict(zip((USER_ID, ITEM_ID, "rating", TIMESTAMP), block.rows(*arrays)))


def _read_latest_ratings(path: Path, bad: BadRows) -> Iterator[Dict[str, np.ndarray]]:
    return _read_ratings(path, bad, ["userId", "movieId", "rating", "timestamp"])


def _read_100k_ratings(path: Path, bad: BadRows) -> Iterator[Dict[str, np.ndarray]]:
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


def _read_latest_movies(path: Path, bad: BadRows) -> Iterator[Dict[str, np.ndarray]]:
    """Blocks of (movie, category of its first genre); a duplicated movie keeps its first line (in SQL)."""
    for block in read_csv(path, ["movieId", "genres"], bad):
        movie = block.ids("movieId")
        first = pc.list_element(pc.split_pattern(block.strings("genres"), "|"), 0)
        first = pc.if_else(pc.equal(first, ""), _NO_GENRE, first)
        yield dict(zip((ITEM_ID, CATEGORY_ID), block.rows(movie, _genre_ids(first))))


def _read_100k_movies(path: Path, bad: BadRows) -> Iterator[Dict[str, np.ndarray]]:
    flags = [f"genre_{i}" for i in range(len(ML100K_GENRES))]
    names = ["movie_id", "title", "release_date", "video_release_date", "url", *flags]
    csv = dict(names=names, delimiter="|", encoding="latin-1", quoting=False)
    for block in read_csv(path, ["movie_id", *flags], bad, **csv):
        movie = block.ids("movie_id")
        matrix = np.stack([block.binary(f) for f in flags], axis=1)
        first = np.where(matrix.any(axis=1), matrix.argmax(axis=1), 0)
        genre_ids = np.array([GENRE_IDS[g] for g in ML100K_GENRES], dtype=np.int64)
        yield dict(zip((ITEM_ID, CATEGORY_ID), block.rows(movie, genre_ids[first])))
