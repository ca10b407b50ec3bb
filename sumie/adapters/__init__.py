"""Changes made to a loaded model (weight patches, module wrappers) and the object that owns them."""
