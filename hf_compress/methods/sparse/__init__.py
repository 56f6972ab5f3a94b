"""Pruning on the shared pipeline: magnitude, Wanda and SparseGPT, unstructured or N:M, stored sparse."""

from hf_compress.registry import Method, register_method

_CLI = "hf_compress.methods.sparse.cli:add_command"
_CARD = {"quantized": "hf_compress.methods.sparse.card:render"}

register_method(Method(
    title="Magnitude pruning", name="magnitude", command="prune",
    summary="magnitude pruning: keep the largest |W| per row (unstructured or N:M), stored sparse",
    config="hf_compress.methods.sparse.config:MagnitudeConfig", cli=_CLI, card=_CARD,
))
register_method(Method(
    title="Wanda", name="wanda", command="prune", paper="[Sun et al., 2023](https://arxiv.org/abs/2306.11695)",
    summary="Wanda: prune by |W|·‖x‖ from calibration data (unstructured or N:M), stored sparse",
    config="hf_compress.methods.sparse.config:WandaConfig", cli=_CLI, card=_CARD,
))
register_method(Method(
    title="SparseGPT", name="sparsegpt", command="prune", paper="[Frantar & Alistarh, 2023](https://arxiv.org/abs/2301.00774)",
    summary="SparseGPT: OBS pruning with Hessian weight updates (unstructured or N:M), stored sparse",
    config="hf_compress.methods.sparse.config:SparseGPTConfig", cli=_CLI, card=_CARD,
))
