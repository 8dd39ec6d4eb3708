"""The chat UI (Gradio page and terminal chat). May import chat_doctor, never tasks/ or flows/."""
