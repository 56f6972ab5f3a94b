"""One folder per method. Each folder's ``__init__.py`` declares its :class:`~hf_compress.registry.Method` (and
nothing heavy); ``registry.BUILTIN_METHODS`` lists the folders. Generic code never imports from here directly."""
