"""HTTP routes: the OpenAI API (models, completions, chat) and Prism's own (admin, ops)."""
