"""Streaming multimodal task mixtures from WebDataset shards (format: docs/data.md)."""

from mmpeft.data.datamodule import ShardDataModule
from mmpeft.data.encode import ChatEncoder
from mmpeft.data.sample import SampleError, parse_sample

__all__ = ["ChatEncoder", "SampleError", "ShardDataModule", "parse_sample"]
