"""`tritongpt2 serve`: an OpenAI-compatible server (FastAPI on uvicorn) with continuous batching.
Needs the `serve` extra: pip install "tritongpt2[serve]"."""
