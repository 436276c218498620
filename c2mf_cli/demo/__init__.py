"""`c2mf demo`: a synthetic world with planted concepts, a small model trained on it, and the whole chain.

- `synthetic`: the seeded image world (primitives, classes, pixel masks).
- `train`: the small timm CNN trained from scratch on it, saved as a factory file + safetensors.
- `pipeline`: generate -> train -> extract -> factorize -> evaluate -> explain/atlas/report.
"""
