"""Routing of pretrained Hugging Face MoE transformers, recorded in moe-lens's trace format (`moe-lens capture`).

adapters.py  one adapter per family (config.model_type -> sparse layers, router, how to read its output)
hooks.py     scoped forward hooks on those routers (a context manager that always removes its handles)
words.py     the split's subword stream and each subword's word (word_idx), a local WordPiece trainer
run.py       the capture loop: model, tokenizer, windows, Recorder; config.json / run.json
cli.py       the `moe-lens capture` subcommand
transformers is imported only when a capture runs (the optional extra `[hf]`). See docs/capture.md.
"""
