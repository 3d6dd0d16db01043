"""The model core: config, layers, attention, caches, the Transformer, generation, sharding.

Imports flow one way: config -> layers -> attention / cache -> model -> generate; sharding.py holds
the one logical-axis -> mesh-axis table. Nothing here reads files or knows about training.
"""
