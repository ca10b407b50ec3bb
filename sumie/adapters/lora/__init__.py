"""LoRA-family adapter files (kohya/A1111, diffusers/PEFT, LyCORIS): names, parsing, weight patches."""
