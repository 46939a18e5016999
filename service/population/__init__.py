"""Screen a population of patients from NDJSON exports, on every core or on Dask."""
