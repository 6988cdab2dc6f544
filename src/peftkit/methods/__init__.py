"""Fine-tuning methods: one file each (its config section, layers, PEFT conversion and capabilities),
listed in `registry.py`. `base.py` holds the contract every method's layers honour."""
