"""Core: project layout and run folders, the records steps hand each other, atomic files and hashes,
the names the config accepts, opt-in fault injection, loggers. Imports nothing of chat_doctor."""
