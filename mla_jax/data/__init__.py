"""Corpora and tokenizers (corpus, tokenizer) and the batch pipelines over them (pipeline)."""
