"""Lineage: the chain from an emoji, a set, a model or a table back to the data and code that made it.

`trace` (the chain), `row` (`--row`: where one row of a dataset arrived), `text` (the report) and `command`
(`emoji-ldm lineage`). The Delta-log reads they need are `emoji_ldm.store.log` and `emoji_ldm.store.delta`.
"""
