"""Training: the SDSAT fine-tuning recipe (`train`) and the small models the project builds
itself (`tinymodel`; `micro`, the micro model the tests and the demo use). The server never
imports these."""
