"""Models: loading a base (embedded, hub or folder; 4 bit or full precision), its tokenizer, merged
models and adapters, and building the embedded bases. May import chat_doctor.core and chat_doctor.config."""
