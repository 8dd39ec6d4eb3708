"""Evaluation: the metrics registry, loss and batched generation, and the report's views (summary,
table, chart). May import chat_doctor.core, config, data and models."""
