"""Raw data to model inputs: tokenizers, processor, toy world, agent tool runtime and the MMAT data engine."""
