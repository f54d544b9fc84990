"""transformers' GPT-2 model classes over the engine, and accelerate() for a loaded transformers model."""
