"""Where ranks are chosen: rank rules (`rules`), the latency search of paper Alg. 1
(`search`), and allocation across layers under a whole-model budget (`allocate`)."""

from .rules import energy_rank, quantize_rank, svd_rank_for_ratio, tucker_ranks_for_ratio, vbmf_rank

__all__ = ["svd_rank_for_ratio", "tucker_ranks_for_ratio", "energy_rank", "vbmf_rank", "quantize_rank"]
