"""Model plumbing of the paged engine: a model's layers stacked for ``lax.scan`` (compile time independent of
depth) or kept per layer for the unrolled decode, and its embedding / final norm / unembedding (``Outer``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dms_jax.model import CausalLM


class Outer(nnx.Module):
    """Embedding, final norm and unembedding of a model. With tied embeddings it keeps a transposed copy of the
    embedding ([hidden, vocab], made once): ``x @ E.T`` inside a jitted loop otherwise re-transposes the whole
    embedding matrix at every decode step on CPU (a 113 MB copy per token for SmolLM2)."""

    def __init__(self, model: CausalLM):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.tie = model.cfg.tie_word_embeddings
        if self.tie:
            self.unembed_t = nnx.Variable(jnp.array(jnp.swapaxes(model.embed_tokens.embedding[...], 0, 1)))
        else:
            self.lm_head = model.lm_head

    def unembed(self, x):
        x = self.norm(x)
        if self.tie:
            x, w = self.embed_tokens.promote_dtype((x, self.unembed_t[...]), dtype=self.embed_tokens.dtype)
            return jnp.dot(x, w).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


def split_model(model: CausalLM):
    """(layer graphdef, stacked layer weights [L, ...] for the prefill's scan, per-layer weights (a tuple) for the
    unrolled decode, outer graphdef, outer state)."""
    splits = [nnx.split(layer) for layer in model.layers]
    layer_gd = splits[0][0]
    per_layer = tuple(s for _, s in splits)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    outer_gd, outer_state = nnx.split(Outer(model))
    return layer_gd, stacked, per_layer, outer_gd, outer_state


def over_layers(body, carry, layer_params, xs):
    """``lax.scan(body, carry, (layer_params, *xs))`` when layer_params is stacked; unrolled in Python when it is a
    tuple of per-layer weights. The unrolled form is the decode's: a scan slices each layer's weights out of the
    stacked arrays, and on CPU those dynamic slices are copies -- every weight copied once per token, which
    doubles the weight traffic of a decode step. The prefill keeps the scan (its matmuls dwarf the copies and it
    compiles in a fraction of the time)."""
    if not isinstance(layer_params, tuple):
        return jax.lax.scan(body, carry, (layer_params,) + tuple(xs))
    ys = []
    for i, params in enumerate(layer_params):
        carry, y = body(carry, (params,) + tuple(jax.tree.map(lambda a: a[i], x) for x in xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
