"""Foundations shared by the pipeline steps: config, model loading, tracking, lineage.

Nothing here imports a step (tasks/) or a flow (flows/), and nothing runs at import time.
"""
