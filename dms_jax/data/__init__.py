"""Text data for DMS distillation: sources, tokenisation, packing, held-out split, resumable batches.

Plain numpy; no JAX needed.  The pipeline is

    corpus.load_documents(source)            -> list[str]       (real text: built-in, .txt, JSONL, HF datasets)
    corpus.split_documents(docs)             -> train, heldout  (document level, by a hash of the text)
    corpus.tokenize_documents(docs, tok)     -> list[np.ndarray]
    packing.pack_tokens(token_docs, seq_len) -> PackedData(tokens, valid, segment_ids)
    dataset.build_dataset(tok, seq_len, ...) -> Dataset(train=PackedData, heldout=PackedData, meta)
    batches.get_batch(data, step, batch_size, seed, process_index, process_count) -> dict of arrays

``synthetic`` makes the training rows that ask for facts far outside the DMS window (``recall_fraction`` of
``build_dataset``).  Modules import one way: corpus, packing <- synthetic <- dataset; packing <- batches.
"""
