"""Make ``generate()`` build a model's own cache from its config, so a saved plan needs no extra argument.

A model class mixes this in and implements ``planned_cache()`` (None = transformers' default). An explicit
``cache=`` / ``past_key_values=`` or ``cache_implementation`` from the caller always wins.
"""

from __future__ import annotations

import inspect


class PlannedCacheMixin:
    """``generate()`` starts from ``self.planned_cache()`` when the caller passes no cache of their own."""

    def planned_cache(self):
        return None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        own = model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None
        if not own and generation_config.cache_implementation is None and generation_config.use_cache is not False:
            cache = self.planned_cache()
            if cache is not None:
                # transformers 5.24+ passes the cache as `cache`; earlier 5.x as `past_key_values`
                takes_cache = "cache" in inspect.signature(self.forward).parameters
                model_kwargs["cache" if takes_cache else "past_key_values"] = cache
                return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
