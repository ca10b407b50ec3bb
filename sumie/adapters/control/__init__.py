"""Control adapters: ControlNet (and T2I-Adapter) files and their use in generation."""
