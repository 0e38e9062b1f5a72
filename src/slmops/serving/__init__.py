"""`slmops serve`: an OpenAI-compatible HTTP server over one base model and its adapters, every adapter a
model id, requests for different adapters decoded together in one batch."""
