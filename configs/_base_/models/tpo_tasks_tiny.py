# The TPO task heads at tiny sizes: a box decoder that reads the patches (the paper's box MLP,
# `RegionHead`, never localises at this size: its LLM does not learn to put the place of an object
# into the task token's hidden state; see RegionDecoderHead's docstring), a query-based moment head,
# a mask decoder and a tracker. Each task gets a begin token
# <|task|> and a query token <|task_query|>; `annotation` says which sample field
# trains it, `weight` scales its loss.
tasks = dict(
    region=dict(head=dict(type="RegionDecoderHead", hidden_dim=32, num_layers=1, num_heads=4), annotation="boxes"),
    temporal=dict(
        head=dict(type="MomentDETRHead", hidden_dim=32, num_queries=4, num_encoder_layers=1,
                  num_decoder_layers=1, num_heads=4, ffn_dim=64),
        annotation="spans",
    ),
    mask=dict(head=dict(type="MaskDecoderHead", hidden_dim=32, num_layers=1, num_heads=4), annotation="masks"),
    track=dict(head=dict(type="TrackHead", hidden_dim=32, num_layers=1, num_heads=4), annotation="tracks"),
)
box_encoder = dict(type="BoxEncoder", hidden_dim=64)
