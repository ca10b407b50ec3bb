"""The sumie-tiny domain: the synthetic coloured-shapes data it is trained on and the detector that scores it."""
