"""The ``chat`` recipe: chat records in transformers' message format (JSONL or a JSON list) as WebDataset shards.

The record format and its checks are the library's (:mod:`mmpeft.data.chat`), because ``data.predict``
reads the same records as prompts; this module is where the recipe registers
(``mmpeft.data_recipes`` entry point ``chat``).
"""

from mmpeft.data.chat import ChatRecipe

__all__ = ["ChatRecipe"]
