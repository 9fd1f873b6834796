"""The engine core: scheduling, KV cache, model runner, sampler. Knows nothing of HTTP."""
