"""The runtime of a rewritten model: what it does after the rewrite.

``api`` (rewrite, from_pretrained) builds a ``model.GraphPeftModel`` around a rewritten graph; the model
trains, saves and loads PEFT's files (``io``), generates with a KV cache (``generation``), merges back
into its own transformers class (``hf_merge``) or into an inference graph (``inference``), and trains
on transformers' Trainer (``train``). The runtime imports the engine, never the command line or export.
"""
