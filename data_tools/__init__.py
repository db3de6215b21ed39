"""Data tools for HGRN2 pretraining: corpus readers, sentencepiece tokenizer, tokenized
Megatron-format datasets (`hgrn2-preprocess`) and blended, shuffled sample indices (`hgrn2-build-mix`).

See docs/data.md for formats, commands and the design of resume and caching.
"""
