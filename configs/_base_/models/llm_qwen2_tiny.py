# A tiny random-init Qwen2 (tied embeddings, biased q/k/v), for tests and CPU demos.
llm = dict(
    type="HFCausalLM",
    config=dict(
        model_type="qwen2",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    attn_implementation="sdpa",
)
