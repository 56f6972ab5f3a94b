"""Rotation and token weighting as options of every quantization config (an option group, see the registry)."""

from __future__ import annotations

TOKEN_WEIGHTINGS = (None, "attention")


def validate(config) -> None:
    if config.token_weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(f"token_weighting must be None or 'attention', got {config.token_weighting!r}")
    if not 0 < config.r_min <= 1:
        raise ValueError(f"r_min must be in (0, 1], got {config.r_min}")
    config.rotate = bool(config.rotate)


def rotate_if_asked(model, config) -> None:
    if config.rotate:
        from hf_compress.methods.rsq.rotation import rotate_model

        rotate_model(model, config.rotation_seed)


def token_weights(config):
    if config.token_weighting != "attention":
        return None
    from hf_compress.methods.rsq.token_weighting import attention_token_weights

    return attention_token_weights(config.r_min)
