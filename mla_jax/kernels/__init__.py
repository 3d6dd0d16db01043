"""Hand-written accelerator kernels (Pallas). Each has a plain-JAX twin it is tested against.

mla_decode: fused absorbed-MLA decode attention (reads each cached latent once), with the
log-sum-exp merge of partial results (`combine_partials`) that split-K and sequence-sharded
decode share. docs/kernels.md describes it.
"""
