"""ARMOR: 2:4 sparse core between block-diagonal factors, optimised per module, stored sparse + factors."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="ARMOR", name="armor", command="prune", paper="[Liu et al., ICLR 2026](https://arxiv.org/abs/2510.05528)",
    summary="ARMOR: 2:4 pruning as A·(W'⊙M)·B with block-diagonal A, B (Adam + exact 2:4 mask steps), stored sparse",
    config="hf_compress.methods.armor.config:ArmorConfig", cli="hf_compress.methods.sparse.cli:add_command",
    card={"quantized": "hf_compress.methods.sparse.card:render"},
))
