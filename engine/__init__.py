"""The GPT-2 engine: config, checkpoints, static KV cache, the forward, CUDA graphs, generation."""
