"""The only package that knows OpenCLIP's trainer: plugin registry, loss plugins, launcher hooks."""
