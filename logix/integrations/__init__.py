"""Integrations with training frameworks, each imported on its own (`logix.integrations.huggingface`)
so that `import logix` never needs the framework."""
