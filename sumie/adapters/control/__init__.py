"""Control adapters: ControlNet and T2I-Adapter files (:mod:`.files`, :mod:`.t2i_files`), the units applied to the UNet
calls of a request (:mod:`.units`), control images (:mod:`.images`)."""
