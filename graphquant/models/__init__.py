"""Model builders and loaders: tiny random models for tests, the llama2.c loader, HF loading."""
