"""Tracking: MLflow runs, the model registry and its promotion rule, DVC lineage, the model card.
May import chat_doctor.core, config, data, models and evaluation."""
