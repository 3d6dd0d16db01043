"""mla_jax: small decoder-only LMs with MHA / GQA / MQA / MLA attention, in JAX + Flax NNX.

    from mla_jax import ModelConfig, Transformer, generate
    cfg = ModelConfig(attention="mla", d_model=256, n_heads=4, kv_lora_rank=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                        # [B, T] int32 -> [B, T, V]
    new_tokens = generate(model, [[1, 2, 3]], max_new_tokens=32, temperature=0.8)
    model = load_model("runs/mla")                # a trained model from its workdir
    wd = Workdir.open("runs/mla")                 # its config, steps, tokenizer; wd.load_model()
"""

from mla_jax.core.cache import Cache
from mla_jax.core.config import ModelConfig, kv_cache_bytes_per_token
from mla_jax.core.generate import generate
from mla_jax.core.model import Transformer, count_params, init_cache
from mla_jax.storage.workdir import Workdir, load_model

__all__ = ["Cache", "ModelConfig", "Transformer", "Workdir", "count_params", "generate",
           "init_cache", "kv_cache_bytes_per_token", "load_model"]
