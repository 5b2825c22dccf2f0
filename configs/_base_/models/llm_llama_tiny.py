# A tiny random-init Llama (grouped-query attention), for tests and CPU demos.
llm = dict(
    type="HFCausalLM",
    config=dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    attn_implementation="sdpa",
)
