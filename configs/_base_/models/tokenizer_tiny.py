# The offline byte-level BPE tokenizer tpo trains itself (no download).
tokenizer = dict(type="TinyTokenizer", vocab_size=512)
