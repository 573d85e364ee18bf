"""Long-context KV retrieval per request (ActQKV, InfLLM, Quest) with a host tier for cold blocks."""
