"""The engine: capture a model as a torch.fx graph and rewrite it, method by method, through rules.

Nothing here names a PEFT method, and nothing here imports the runtime, the command line, export or
the rules: rules reach the engine, and the engine reaches rules only through ``registry``.

The rule API (what ``graphpeft.passes`` may import) is this package's modules:
    rule, rewriter, result, registry, config, errors   a rule's parts, its only mutator, its records, its errors
    match                                               sites: which nodes a rule may anchor on
    capture, meta_buffers, losses, hf_hub               the captured graph and what it knows of the model
    sequence, virtual_tokens, patch_sequence,           positions prepended to a sequence (text, ViT patches,
    frame_sequence, window_sequence                     audio frames, Swin windows)
    filler_positions, attention_shapes, kv_prepend,     key/value positions prepended at attention sites, and
    past_key_values                                     the layout of their table as a cache
    quantized, quantized_ops                            quantized weight ops as sites; dequantize, requantize
    pass_manager                                        runs passes and names the one that failed
"""
