"""Leaf helpers every floor may import: atomic files, hashing, manifests' member paths
(``files``) and model input signatures (``signature``). Nothing here imports the rest of finegrain
but ``finegrain.errors``."""
