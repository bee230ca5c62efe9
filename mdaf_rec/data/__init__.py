"""Data: the canonical Parquet schema, converters, vocabularies and the batch loader."""
