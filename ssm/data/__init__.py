"""Datasets: TFDS builders written as array_record, read through grain pipelines."""
