"""Serving: a registered or local model ready to chat, its GGUF export for llama.cpp and Ollama, and
the `chat-doctor-models` CLI. May import chat_doctor.core, config, data, models and tracking."""
