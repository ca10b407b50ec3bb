"""Control: ControlNet units applied to the UNet calls of a request (:mod:`.units`), control images (:mod:`.images`)."""
