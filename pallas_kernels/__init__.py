"""Pallas kernels for dms-jax: paged decode attention and DMS-masked flash attention, and the blocked XLA
paged attention the engine uses on CPU.

Every kernel has a pure-jnp reference with the same signature, a TPU lowering (Mosaic) and a GPU lowering
(Pallas' own Triton backend; jax-triton is not used, see docs/kernels.md), and a dispatch function with
``backend="auto" | "xla" | "pallas_tpu" | "pallas_gpu"`` (auto = xla on CPU, the Pallas kernel on TPU/GPU) and
``interpret=None | True | False`` (None = interpret mode when the backend's hardware is absent).

1. Paged decode attention (one layer, one decode step)::

       paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None,
                              backend="auto", interpret=None, pages_per_block=None, num_splits=None)
       q            [B, Hkv, G, D]          the G query heads of each KV head; bf16/f16/f32
       k_pages      [num_pages, page_size, D]  static pool shared by all sequences, layers and KV heads;
       v_pages      [num_pages, page_size, D]  one page holds tokens of one (sequence, layer, KV head)
       block_tables [B, Hkv, max_pages] int32  physical page ids; entries past the used pages: any in-range id
       lengths      [B, Hkv] int32          slots 0..length-1 of the head's pages (block-table order) are live;
                                            no causal mask (physical order is not temporal order)
       page_mask    [B, Hkv, max_pages] bool, optional: True = read the page, False = skip it (Quest)
       -> [B, Hkv, G, D] in q's dtype; f32 online softmax across pages; length 0 -> zeros.

   ``paged_decode_attention_reference`` (jnp, gathers pages), ``paged_decode_attention_pallas_tpu`` (scalar
   prefetch of tables/lengths, DMA of live pages only), ``paged_decode_attention_pallas_gpu`` (Triton, block
   table entries loaded in the kernel, split over live pages). ``live_kv_bytes`` gives the K/V bytes a
   live-pages-only kernel moves for given lengths.

2. DMS-masked flash attention (training / prefill), differentiable w.r.t. q, k, v and log_keep::

       dms_flash_attention(q, k, v, q_pos, k_pos, log_keep=None, k_valid=None, *, window, scale=None,
                           backend="auto", interpret=None, block_q=None, block_k=None, skip_blocks=True)
       q [B, T, Hq, D]; k, v [B, S, Hkv, D] (query head h uses KV head h // G); q_pos [B, T], k_pos [B, S]
       int32 absolute positions; log_keep [B, Hkv, S] f32 (added when q_pos - k_pos > window: log(1 - alpha)
       in training, 0 / -inf in hard mode); k_valid [B, S] bool; window static int.
       bias = -inf if k_pos > q_pos or key invalid; 0 if q_pos - k_pos <= window; log_keep otherwise.
       -> [B, T, Hq, D] in q's dtype. Rows that see no key give zeros.

   ``dms_flash_attention_reference`` (materialises the bias, ``dms_jax.dms.dms_attention_bias`` with -inf
   for masked entries; jax.grad gives the reference gradients) and ``dms_flash_block_map`` (which
   (q block, kv block) pairs the kernels visit). The window rule itself is ``dms_jax.dms.visible_if_marked``.

3. Blocked paged attention in plain XLA (``xla_blocked.py``; the engine's "xla_blocked" backend, its CPU
   default)::

       paged_attention_blocked(q, k_pages, v_pages, block_tables, lengths, *, scale=None, block_tokens=None,
                               return_pools=False, new_kv=None, exclude_slot=None, thread_pools=False)

   the contract of ``paged_decode_attention``, as an online softmax over blocks of cached pages that stops at
   the longest live head (``online_blocks``, which the engine's prefill also uses for its cached keys).
   ``new_kv`` / ``exclude_slot`` let a caller attend to a token before writing it into the pool.
"""

from .dms_flash import (
    dms_flash_attention,
    dms_flash_attention_reference,
    dms_flash_block_map,
)
from .paged_decode import (
    live_kv_bytes,
    paged_decode_attention,
    paged_decode_attention_pallas_gpu,
    paged_decode_attention_pallas_tpu,
    paged_decode_attention_reference,
)
from .xla_blocked import online_blocks, paged_attention_blocked

__all__ = [
    "dms_flash_attention",
    "dms_flash_attention_reference",
    "dms_flash_block_map",
    "live_kv_bytes",
    "online_blocks",
    "paged_attention_blocked",
    "paged_decode_attention",
    "paged_decode_attention_pallas_gpu",
    "paged_decode_attention_pallas_tpu",
    "paged_decode_attention_reference",
]
