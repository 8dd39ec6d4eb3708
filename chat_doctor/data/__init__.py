"""Data: opening sources, checking and cleaning rows, the synthetic sample, prompt templates and the
tokenized-split format. May import chat_doctor.core and chat_doctor.config."""
