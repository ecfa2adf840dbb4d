"""The built-in model's world and detector (`shapes`), its tokenizer trainer (`tokenizers`) and its trainer
(`python -m scripts.builtin.train`, run from the repository root)."""
