"""Hand-written accelerator kernels (Pallas). Each has a plain-JAX twin it is tested against.

mla_decode: fused absorbed-MLA decode attention (reads each cached latent once). Its splits are
merged with core/ops.py's log-sum-exp `combine_partials`, the one every partial attention of the
package (sequence-sharded decode, the cache and the new tokens) goes through. docs/kernels.md
describes it.
"""
