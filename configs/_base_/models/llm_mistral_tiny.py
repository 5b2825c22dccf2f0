# A tiny random-init Mistral, for tests and CPU demos.
llm = dict(
    type="HFCausalLM",
    config=dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        sliding_window=None,
    ),
    attn_implementation="sdpa",
)
