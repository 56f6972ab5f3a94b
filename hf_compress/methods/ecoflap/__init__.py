"""ECoFLaP: zeroth-order block importance → per-block sparsity (water-filling with a cap) → Wanda/SparseGPT."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="ECoFLaP", name="ecoflap", command="prune",
    paper="[Sung, Yoon & Bansal, ICLR 2024](https://arxiv.org/abs/2310.02998)",
    summary="ECoFLaP: per-block sparsity from zeroth-order importance (forward passes only), then Wanda/SparseGPT",
    config="hf_compress.methods.ecoflap.config:EcoflapConfig", cli="hf_compress.methods.sparse.cli:add_command",
    card={"quantized": "hf_compress.methods.sparse.card:render"},
))
